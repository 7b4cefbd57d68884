"""DAPO's trainer-side techniques in `pgzoo train` (pgzoo.adapters.lightning.sampling): dynamic sampling on a fake
task and engine (full batches, the draw metrics, determinism, the bound, two gloo ranks = one process), the overlong
penalty and the truncation mask on constructed batches, the recipe options, and one short end-to-end run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pgzoo
from pgzoo.adapters.lightning.sampling import (has_signal, loss_mask, overlong_penalty, prompt_seed, problem_seed,
                                               sample_groups)
from pgzoo.errors import ConfigError
from pgzoo.recipes import load_recipe, recipe_from_dict
from pgzoo.recipes.diff import check_resume
from pgzoo.rollout.base import mix_seed

sys.path.insert(0, str(Path(__file__).parent))
from _sampling_fakes import FakeTask, fake_draw, rows_by_group  # noqa: E402

B, G, STEP_SEED = 4, 2, 1234


def run(max_draws, task=None, step_seed=STEP_SEED, routes=True):
    draw, calls = fake_draw(G, routes=routes)
    got = sample_groups(task or FakeTask(), draw, step=5, step_seed=step_seed, prompts=B, group_size=G,
                        max_draws=max_draws)
    return got, calls


def expected_groups(step_seed=STEP_SEED, routes=True):
    """What one process must train on, derived without sample_groups: draw d's problems and seeds by the documented
    formulas, the groups of odd problems (rewards 0/1/...) in draw order, the first B; each group's rows from the
    fake engine on that problem alone (its rows depend on the problem and seed only)."""
    task, want, draws = FakeTask(), [], 0
    while len(want) < B:
        seed = step_seed if draws == 0 else mix_seed(step_seed, draws, -1)
        for i, p in enumerate(task.sample(B, seed=seed)):
            if int(p.prompt) % 2 and len(want) < B:
                draw, _ = fake_draw(G, routes=routes)
                s = mix_seed(step_seed, i) if draws == 0 else mix_seed(step_seed, draws, i)
                ro, rw = draw([p], [s])
                want.append((p.prompt, rows_by_group(ro, rw, G)[0]))
        draws += 1
    return want, draws


def test_off_is_the_plain_step():
    got, calls = run(None)
    problems = FakeTask().sample(B, seed=STEP_SEED)
    assert calls == [([p.prompt for p in problems], [mix_seed(STEP_SEED, i) for i in range(B)])]  # today's seeds
    assert got.metrics == {} and got.rollouts.prompt_ids.shape[0] == B * G


def test_groups_without_signal_are_replaced_by_further_draws():
    """About half of the fake groups have identical rewards: the step still holds B groups, each with signal, the
    first B in draw order, and the metrics count the draws."""
    got, calls = run(10)
    want, draws = expected_groups()
    assert draws > 1  # the seed was chosen so that the first draw is not enough
    assert got.rollouts.prompt_ids.shape[0] == B * G == got.rewards.shape[0]
    assert bool(has_signal(got.rewards.view(B, G)).all())
    assert [p.prompt for p in got.problems] == [w[0] for w in want]
    assert rows_by_group(got.rollouts, got.rewards, G) == [w[1] for w in want]
    assert len(calls) == draws
    for d, (_, seeds) in enumerate(calls):
        assert seeds == [prompt_seed(STEP_SEED, d, i) for i in range(B)]
    drawn = [p for d in range(draws) for p in FakeTask().sample(B, seed=problem_seed(STEP_SEED, d))]
    odd = sum(int(p.prompt) % 2 for p in drawn)
    assert got.metrics["sampling/draws"] == draws
    assert got.metrics["sampling/prompts_drawn"] == draws * B
    assert got.metrics["sampling/groups_with_signal"] == odd
    assert got.metrics["sampling/signal_frac"] == pytest.approx(odd / (draws * B))
    # rewards of every drawn row: 1 for even problems, 0/1 alternating (mean 1/2) for odd ones
    assert got.metrics["sampling/reward_mean_drawn"] == pytest.approx((draws * B - odd + odd / 2) / (draws * B))


def test_draws_are_functions_of_seed_step_and_draw():
    a, _ = run(10)
    b, _ = run(10)
    assert rows_by_group(a.rollouts, a.rewards, G) == rows_by_group(b.rollouts, b.rewards, G)
    c, _ = run(10, step_seed=STEP_SEED + 1)
    assert rows_by_group(c.rollouts, c.rewards, G) != rows_by_group(a.rollouts, a.rewards, G)
    seeds = {problem_seed(STEP_SEED, d) for d in range(50)} | {prompt_seed(STEP_SEED, d, i)
                                                                for d in range(50) for i in range(B)}
    assert len(seeds) == 50 + 50 * B  # no draw's seeds meet another's


def test_a_full_first_draw_is_kept_as_it_is():
    class AllOdd(FakeTask):
        def sample(self, n, split="train", seed=0):
            return [pgzoo.tasks.base.Problem(prompt=str(2 * int(p.prompt) + 1), answer="")
                    for p in super().sample(n, split, seed)]

    plain, _ = run(None, AllOdd())
    got, calls = run(3, AllOdd())
    assert len(calls) == 1 and got.metrics["sampling/draws"] == 1 and got.metrics["sampling/signal_frac"] == 1
    for name in ("prompt_ids", "completion_ids", "logprobs", "routes"):
        assert torch.equal(getattr(got.rollouts, name), getattr(plain.rollouts, name))


def test_the_bound_stops_the_run_naming_the_key():
    class AllEven(FakeTask):
        def sample(self, n, split="train", seed=0):
            return [pgzoo.tasks.base.Problem(prompt=str(2 * int(p.prompt)), answer="")
                    for p in super().sample(n, split, seed)]

    with pytest.raises(ConfigError, match=r"step 5 kept 0 of the 4 groups.*max_draws=3.*"
                                          r"rollout.dynamic_sampling.max_draws"):
        run(3, AllEven())


@pytest.mark.parametrize("routes", [True, False])
def test_two_gloo_ranks_hold_the_one_process_groups(tmp_path, routes):
    """Each rank holds kept groups r, r + 2, ... of what one process keeps, with the same rows (routes too), and
    the same metrics, whichever rank sampled them."""
    from test_data_parallel import torchrun_env, free_port

    port = free_port()
    worker = Path(__file__).parent / "_sampling_worker.py"
    procs = [subprocess.Popen([sys.executable, str(worker), str(tmp_path), str(int(routes))],
                              env=torchrun_env(r, 2, port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for r in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    single, _ = run(10, routes=routes)
    groups = rows_by_group(single.rollouts, single.rewards, G)
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["groups"] == json.loads(json.dumps(groups[rank::2]))
        assert got["problems"] == [p.prompt for p in single.problems][rank::2]
        assert got["metrics"] == single.metrics


# ---------------------------------------------------------------------- overlong shaping, truncation mask
def test_overlong_penalty_ramps_over_the_buffer():
    lengths = torch.tensor([3, 6, 7, 8, 10])
    assert overlong_penalty(lengths, 10, 4, 1.0).tolist() == [0.0, 0.0, -0.25, -0.5, -1.0]
    assert overlong_penalty(lengths, 10, 4, 0.5).tolist() == [0.0, 0.0, -0.125, -0.25, -0.5]


def test_overlong_penalty_gives_an_all_correct_group_a_length_signal():
    """Four correct answers of 3, 7, 8 and 10 tokens (max 10, buffer 4): equal task rewards, so no advantage; with
    the penalty, the short answers get positive advantages and the truncated one the lowest."""
    rewards, lengths = torch.ones(4), torch.tensor([3, 7, 8, 10])
    assert pgzoo.advantages.compute("group-mean-std", rewards, group_size=4).abs().max() == 0
    adv = pgzoo.advantages.compute("group-mean-std", rewards + overlong_penalty(lengths, 10, 4, 1.0), group_size=4)
    assert adv[0] > 0 and adv[0] > adv[1] > adv[2] > adv[3] and adv[3] < 0


def _sgd_module(mask_truncated: bool):
    from pgzoo.adapters.lightning.module import RLModule
    from pgzoo.models import build_tiny_moe

    class SGDModule(RLModule):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.policy.parameters(), lr=self.tr.lr)
            return [opt], [torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)]

    recipe = recipe_from_dict({"objective": {"name": "dapo"},
                               "rollout": {"prompts_per_step": 4, "group_size": 2, "max_new_tokens": 6},
                               "train": {"lr": 1.0, "grad_clip": None, "micro_batch_size": 2,
                                         "mask_truncated_completions": mask_truncated}})
    torch.manual_seed(0)
    return SGDModule(build_tiny_moe(vocab_size=100, seed=0), None, pgzoo.get("dapo"), None, None, recipe)


def test_masked_truncated_rows_train_like_their_absence():
    """Masking the truncated rows of a batch gives the step of the batch without them (the token-mean normaliser
    counts only the rest), and a different step from not masking them."""
    from _dp_worker import batch

    from pgzoo.adapters.lightning.loop_data import RolloutBatch

    data = batch()  # 8 rows; completions of 6 tokens (rows 0 and 5) reach max_new_tokens = 6
    data.truncated = data.completion_mask.sum(-1) == 6
    assert data.truncated.tolist() == [True, False, False, False, False, True, False, False]
    keep = torch.tensor([1, 2, 3, 4, 6, 7])
    data.loss_mask = loss_mask(data.completion_mask, data.truncated)
    assert data.loss_mask[~data.truncated].equal(data.completion_mask[~data.truncated])
    assert not data.loss_mask[data.truncated].any()

    masked = _sgd_module(True)
    masked.update(data)
    without = _sgd_module(True)
    rest = RolloutBatch(**{k: (v[keep] if isinstance(v, torch.Tensor) else v) for k, v in data.__dict__.items()})
    rest.loss_mask = None
    without.update(rest)
    plain = _sgd_module(False)
    data.loss_mask = None
    plain.update(data)
    a, b, c = (m.policy.state_dict() for m in (masked, without, plain))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    assert max(float((a[k] - c[k]).abs().max()) for k in a) > 1e-4


# ---------------------------------------------------------------------- recipe options
def test_recipe_options_are_strict_and_checked():
    r = recipe_from_dict({"rollout": {"dynamic_sampling": {"max_draws": 5},
                                      "overlong_buffer": {"len": 8, "penalty_factor": 0.5}, "max_new_tokens": 32},
                          "train": {"mask_truncated_completions": True}})
    assert (r.rollout.dynamic_sampling.max_draws, r.rollout.overlong_buffer.len) == (5, 8)
    defaults = recipe_from_dict({})
    assert defaults.rollout.dynamic_sampling is None and defaults.rollout.overlong_buffer is None
    assert defaults.train.mask_truncated_completions is False
    for bad, match in [({"rollout": {"dynamic_sampling": {"max_draws": 0}}}, "max_draws"),
                       ({"rollout": {"dynamic_sampling": {"max_draws": 2.0}}}, "max_draws"),
                       ({"rollout": {"overlong_buffer": {}}}, "len"),
                       ({"rollout": {"overlong_buffer": {"len": 4, "penalty_factor": -1.0}}}, "penalty_factor"),
                       ({"train": {"mask_truncated_completions": "true"}}, "mask_truncated_completions"),
                       ({"rollout": {"overlong_buffer": {"len": 40}, "max_new_tokens": 32}},
                        r"overlong_buffer.len=40 is longer than rollout.max_new_tokens=32.*len <= 32")]:
        with pytest.raises(ConfigError, match=match):
            recipe_from_dict(bad).check()


def test_resume_refuses_the_techniques_but_lets_the_bound_grow():
    on = {"rollout": {"dynamic_sampling": {"max_draws": 5}, "overlong_buffer": {"len": 8}},
          "train": {"mask_truncated_completions": True}}
    a = recipe_from_dict(on).model_dump(mode="json")
    more = recipe_from_dict({**on, "rollout": {**on["rollout"], "dynamic_sampling": {"max_draws": 20}}})
    assert check_resume(a, more.model_dump(mode="json"), ["rollout.dynamic_sampling.max_draws"]) == [
        "rollout.dynamic_sampling.max_draws"]
    for key, value in [("rollout.dynamic_sampling", None), ("rollout.overlong_buffer.penalty_factor", 0.5),
                       ("train.mask_truncated_completions", False)]:
        changed = recipe_from_dict(on, [f"{key}={'null' if value is None else str(value).lower()}"])
        with pytest.raises(ConfigError, match=key.rsplit(".", 1)[0]):
            check_resume(a, changed.model_dump(mode="json"), [key])


def test_the_shipped_dapo_recipe_uses_every_technique():
    r = load_recipe("tiny/dapo")
    assert r.objective.name == "dapo" and pgzoo.get("dapo").config.eps_high == 0.28
    assert r.rollout.dynamic_sampling is not None and r.rollout.overlong_buffer is not None
    assert r.rollout.overlong_buffer.len * 5 == r.rollout.max_new_tokens  # the paper's 4,096 of 20,480
    assert r.train.mask_truncated_completions


# ---------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_a_short_dapo_run_trains_full_batches(tmp_path, monkeypatch):
    """Three steps on a task where every even first operand gets reward 1 for any answer (a group of identical
    rewards): each step updates on B·G rows whose groups all have signal, and the metrics say how many were drawn."""
    import pgzoo.adapters.lightning.run as train_mod
    from pgzoo.adapters.lightning.module import RLModule
    from pgzoo.models import fresh_tiny_checkpoint
    from _train_helpers import RECIPE, DigitFraction, overrides

    class HalfSaturated(DigitFraction):
        name = "half-saturated-test"

        def reward(self, completion, problem):
            return 1.0 if int(problem.prompt.split("+")[0].split("-")[0].split("*")[0]) % 2 == 0 else \
                super().reward(completion, problem)

    pgzoo.tasks.register("half-saturated-test", override=True)(HalfSaturated)
    seen = []
    real = RLModule.update

    def spy(self, data, **kw):
        seen.append((data.prompt_ids.shape[0], data.rewards.view(-1, self.ro.group_size)))
        return real(self, data, **kw)

    monkeypatch.setattr(RLModule, "update", spy)
    try:
        ckpt = fresh_tiny_checkpoint(tmp_path / "tiny")
        recipe = load_recipe(RECIPE, overrides(ckpt, tmp_path / "run", "train.steps=3", "task.name=half-saturated-test",
                                               "objective.name=dapo", "rollout.dynamic_sampling.max_draws=8",
                                               "rollout.overlong_buffer.len=2", "train.mask_truncated_completions=true"))
        rows = train_mod.train(recipe, quiet=True).history
    finally:
        pgzoo.tasks.unregister("half-saturated-test")
    assert [n for n, _ in seen] == [16, 16, 16]
    assert all(bool(has_signal(r).all()) for _, r in seen)
    assert sum(row["sampling/draws"] for row in rows) > 3  # some step needed a second draw
    for row in rows:
        assert row["sampling/prompts_drawn"] == 4 * row["sampling/draws"]
        assert row["sampling/groups_with_signal"] >= 4
        assert -1.0 <= row["reward/overlong_penalty_mean"] <= 0 and 0 <= row["reward/overlong_frac"] <= 1
        assert row["response/masked_truncated_frac"] == pytest.approx(row["response/truncated_frac"])
