"""The main job end to end on the tiny MoE (transformers rollouts: fast), resume equality after the engine dies,
reward errors that show the sample, R2/R3 engaged every step."""

from __future__ import annotations

import json

import pytest
import torch

import pgzoo.adapters.lightning.run as train_mod
from pgzoo.errors import EngineError, PgzooError
from pgzoo.recipes import load_recipe

from pgzoo.models import fresh_tiny_checkpoint
from _train_helpers import (RECIPE, DyingEngine, digit_fraction_task, overrides,  # noqa: F401
                            assert_same_rows)

REQUIRED = ["reward/mean", "reward/accuracy", "response/length_mean", "response/truncated_frac", "entropy/mean",
            "kl/train_inference_k1", "clip/low_fraction", "clip/high_fraction", "is/weight_mean", "is/weight_max",
            "first_order/gap_total", "time/step", "time/rollout", "time/update", "throughput/tokens_per_s",
            "grad_norm", "lr"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return fresh_tiny_checkpoint(tmp_path_factory.mktemp("fresh") / "tiny")


def test_short_run_writes_the_run_folder(ckpt, tmp_path):
    out = tmp_path / "run"
    recipe = load_recipe(RECIPE, overrides(ckpt, out, "train.steps=3", "output.checkpoint_every=2",
                                           "output.plots=true", "eval.after=true", "eval.num_problems=8"))
    res = train_mod.train(recipe, quiet=True)
    assert [r["step"] for r in res.history] == [0, 1, 2]
    for key in REQUIRED:
        assert key in res.history[-1], key
    assert 0.0 < res.history[0]["reward/mean"] < 1.0
    assert {p.name for p in (out / "plots").glob("*.png")} >= {"reward.png", "entropy.png", "train_inference_kl.png"}
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000003"]
    assert res.checkpoint.name == "step-000003"
    assert "greedy_accuracy" in json.loads((out / "eval.json").read_text())["after"]
    # the checkpoint is a Hugging Face folder holding the trained weights
    import transformers

    trained = transformers.AutoModelForCausalLM.from_pretrained(res.checkpoint)
    start = transformers.AutoModelForCausalLM.from_pretrained(ckpt)
    delta = sum((a - b).abs().sum() for a, b in zip(trained.state_dict().values(), start.state_dict().values()))
    assert delta > 0
    assert (out / "metrics.csv").read_text().count("\n") == 4  # header + 3 steps
    # a second run into the same folder refuses to overwrite it
    with pytest.raises(PgzooError, match="--resume"):
        train_mod.train(recipe, quiet=True)


@pytest.mark.slow
def test_engine_dies_then_resume_continues_exactly(ckpt, tmp_path, monkeypatch):
    steps = ["train.steps=4", "output.checkpoint_every=2"]
    full = train_mod.train(load_recipe(RECIPE, overrides(ckpt, tmp_path / "full", *steps)), quiet=True)

    crash = load_recipe(RECIPE, overrides(ckpt, tmp_path / "crash", *steps))
    real = train_mod.build_engine
    monkeypatch.setattr(train_mod, "build_engine", lambda r, p: DyingEngine(real(r, p), die_at=3))
    with pytest.raises(EngineError, match=r"failed at step 2.*engine core died.*step-000002.*intact.*--resume"):
        train_mod.train(crash, quiet=True, command="pgzoo train x.yaml")
    assert (tmp_path / "crash" / "checkpoints" / "step-000002" / "trainer_state.pt").is_file()
    monkeypatch.setattr(train_mod, "build_engine", real)
    resumed = train_mod.train(crash, resume=True, quiet=True)

    assert [r["step"] for r in resumed.history] == [0, 1, 2, 3]
    assert_same_rows(full.history, resumed.history)
    # the weights after resuming equal the uninterrupted run's
    import transformers

    wa = transformers.AutoModelForCausalLM.from_pretrained(full.checkpoint).state_dict()
    wb = transformers.AutoModelForCausalLM.from_pretrained(resumed.checkpoint).state_dict()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5)


def test_reward_function_raising_shows_the_sample(ckpt, tmp_path, monkeypatch):
    from _train_helpers import DigitFraction

    def broken(self, completion, problem):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(DigitFraction, "reward", broken)
    recipe = load_recipe(RECIPE, overrides(ckpt, tmp_path / "r", "train.steps=2"))
    with pytest.raises(PgzooError, match=r"reward function .* raised ZeroDivisionError.*prompt='\d+\+\d+=' "
                                         r"completion=.* answer="):
        train_mod.train(recipe, quiet=True)


@pytest.mark.parametrize("extra", [
    ["train.routing_replay=R2", "train.num_minibatches=2"],
    ["train.routing_replay=R3", "train.micro_batch_size=8"],
], ids=["R2-N2", "R3-N1-micro"])
def test_routing_replay_engaged_every_step(ckpt, tmp_path, extra):
    recipe = load_recipe(RECIPE, overrides(ckpt, tmp_path / "rr", "train.steps=2", *extra))
    res = train_mod.train(recipe, quiet=True)
    for row in res.history:
        assert row["routing/layers_hit"] == row["routing/num_moe_layers"] == 4
        # replay forces the stored routes, so the policy only drifts from them through its own update (< all)
        key = "routing/drift_update"
        assert key in row and 0.0 <= row[key] < 0.5
    if recipe.train.num_minibatches > 1:
        assert res.history[-1]["time/old_logprobs"] > 0


def test_off_policy_grpo_with_reference_model(ckpt, tmp_path):
    """Objectives with a KL penalty get a frozen reference policy; off-policy mini-batches see ratios != 1."""
    recipe = load_recipe(RECIPE, overrides(ckpt, tmp_path / "g", "train.steps=1", "objective.name=grpo",
                                           "objective.options.beta=0.05", "train.num_minibatches=2"))
    res = train_mod.train(recipe, quiet=True)
    row = res.history[-1]
    assert row["ratio/max"] != 1.0 or row["ratio/min"] != 1.0


def test_a_star_po_trains_against_the_reference_model(ckpt, tmp_path):
    """A*-PO reads the reference log-probs in its own term (no β): the trainer loads the reference policy for it."""
    recipe = load_recipe(RECIPE, overrides(ckpt, tmp_path / "a", "train.steps=2", "objective.name=a-star-po",
                                           "objective.advantage=a-star", "objective.options.beta2=0.01"))
    first, second = train_mod.train(recipe, quiet=True).history
    assert abs(first["astar_po/implicit_reward_mean"]) < 1e-6  # π_θ = π_ref before the first update
    assert abs(second["astar_po/implicit_reward_mean"]) > 1e-5
    assert first["astar_po/advantage_mean"] <= 0.0  # V* = β1·log mean exp(r/β1) is at least the group's mean


@pytest.mark.slow
@pytest.mark.vllm
def test_short_run_with_vllm_rollouts(ckpt, tmp_path):
    """The main job's path: vLLM CPU rollouts, weight sync after every step. μ from vLLM must keep matching the
    policy (k1 ~ 0) after each in-place reload, or the sync is broken."""
    pytest.importorskip("vllm")
    recipe = load_recipe(RECIPE, overrides(ckpt, tmp_path / "v", "rollout.engine=vllm", "train.steps=3",
                                           "output.checkpoint_every=0"))
    res = train_mod.train(recipe, quiet=True)
    assert [r["step"] for r in res.history] == [0, 1, 2]
    for row in res.history:
        assert abs(row["kl/train_inference_k1"]) < 1e-4, row["kl/train_inference_k1"]
        assert row["log_ratio/train_inference_abs_mean"] < 1e-3
        assert 0.0 < row["reward/mean"] < 1.0
    assert res.checkpoint is not None and res.checkpoint.name == "step-000003"


def test_periodic_evaluation_is_logged(ckpt, tmp_path):
    out = tmp_path / "e"
    recipe = load_recipe(RECIPE, overrides(ckpt, out, "train.steps=3", "eval.every=1", "eval.num_problems=4"))
    train_mod.train(recipe, quiet=True)
    during = json.loads((out / "eval.json").read_text())["during"]
    assert sorted(during) == ["1", "2"] and "greedy_accuracy" in during["1"]
    header = (out / "metrics.csv").read_text().splitlines()[0]
    assert "eval/greedy_accuracy" in header


class _StaleEngine(DyingEngine):
    """An engine whose weight sync silently does nothing after the first ``good`` syncs (a broken in-place reload)."""

    def __init__(self, inner, good):
        super().__init__(inner, die_at=-1)
        self.good, self.syncs = good, 0

    def load_weights(self, model):
        self.syncs += 1
        if self.syncs <= self.good:
            self.inner.load_weights(model)


def test_verify_sync_logs_parity_and_stops_a_silently_broken_sync(ckpt, tmp_path, monkeypatch):
    ok = train_mod.train(load_recipe(RECIPE, overrides(ckpt, tmp_path / "ok", "train.steps=2",
                                                       "rollout.verify_sync=1e-4")), quiet=True)
    for row in ok.history:  # float32 engine and trainer: parity to round-off after every sync
        assert 0.0 <= row["sync/logprob_abs_diff_mean"] < 1e-5 and row["sync/logprob_abs_diff_max"] < 1e-4

    real = train_mod.build_engine
    monkeypatch.setattr(train_mod, "build_engine", lambda r, p: _StaleEngine(real(r, p), good=1))
    stale = load_recipe(RECIPE, overrides(ckpt, tmp_path / "stale", "train.steps=4", "output.checkpoint_every=1",
                                          "rollout.verify_sync=1e-4"))
    with pytest.raises(EngineError, match=r"step 1: weight sync check failed.*mean \|log μ − log π\|.*"
                                          r"step-000001.*intact.*--resume"):
        train_mod.train(stale, quiet=True, command="pgzoo train x.yaml")
    # without the check the same broken engine trains on silently
    monkeypatch.setattr(train_mod, "build_engine", lambda r, p: _StaleEngine(real(r, p), good=1))
    silent = train_mod.train(load_recipe(RECIPE, overrides(ckpt, tmp_path / "silent", "train.steps=3")), quiet=True)
    assert len(silent.history) == 3 and "sync/logprob_abs_diff_mean" not in silent.history[-1]


def test_reinforce_pp_with_gamma_trains_on_per_token_advantages(ckpt, tmp_path, monkeypatch):
    """objective.advantage_options reach the estimator: reinforce++ with gamma < 1 gives the loop [n, T] advantages,
    whitened over the step's completion tokens (0 at padding), and the objective trains on them."""
    import pgzoo.adapters.lightning.module as module

    seen = []

    def spy(*args, **kwargs):
        adv = step_advantages(*args, **kwargs)
        seen.append((adv, args[2], kwargs["width"]))
        return adv

    step_advantages = module.step_advantages
    monkeypatch.setattr(module, "step_advantages", spy)
    recipe = load_recipe(RECIPE, overrides(ckpt, tmp_path / "rpp", "train.steps=1", "objective.name=grpo",
                                           "objective.advantage=reinforce++", "objective.advantage_options.gamma=0.5"))
    res = train_mod.train(recipe, quiet=True)
    (adv, lengths, width), = seen
    assert adv.shape == (recipe.rollout.prompts_per_step * recipe.rollout.group_size, width)
    mask = torch.arange(width)[None] < lengths[:, None].cpu()
    assert bool((adv[~mask] == 0).all())
    assert any(row[m].unique().numel() > 1 for row, m in zip(adv, mask))  # discounted: a row's tokens differ
    assert torch.isfinite(torch.tensor(res.history[-1]["loss"]))
