"""Asynchronous RL (``rollout.max_staleness``): the setting's checks, the staleness schedule, and end to end on the tiny
MoE (transformers rollouts, and vLLM with its engine core in its own process): every row is trained at most k
versions after the weights that sampled it, its μ are those weights' log-probs (rescored from a saved copy of them),
π_θold is the current weights', and a run killed mid-way resumes to the uninterrupted run's rows and weights."""

from __future__ import annotations

import importlib.util
import threading
import time

import pytest
import torch

import pgzoo.adapters.lightning.module as module_mod
import pgzoo.adapters.lightning.run as train_mod
from pgzoo.adapters.lightning.module import RLModule
from pgzoo.adapters.lightning.pipeline import ROLLOUTS_DIR, RolloutPipeline, generation_version
from pgzoo.adapters.lightning.sampling import Sampled
from pgzoo.errors import ConfigError, EngineError
from pgzoo.recipes import load_recipe, recipe_from_dict
from pgzoo.rollout.base import Rollouts

from pgzoo.models import fresh_tiny_checkpoint
from _train_helpers import (RECIPE, DyingEngine, assert_same_rows, digit_fraction_task,  # noqa: F401
                            overrides)


# ---------------------------------------------------------------------- the setting
@pytest.mark.parametrize("value, match", [("-1", "greater than or equal to 0"), ("1.0", "valid integer"),
                                          ('"1"', "valid integer"), ("true", "valid integer")])
def test_max_staleness_is_a_strict_non_negative_int(value, match):
    with pytest.raises(ConfigError, match=f"rollout.max_staleness: Input should be (a )?{match}"):
        load_recipe(RECIPE, ["rollout.engine=transformers", f"rollout.max_staleness={value}"])


def test_what_cannot_run_asynchronously_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"rollout.max_staleness=1 with rollout.dynamic_sampling.*collective"):
        recipe_from_dict({"rollout": {"engine": "transformers", "max_staleness": 1,
                                      "dynamic_sampling": {"max_draws": 2}}})


def test_vllm_runs_asynchronously_with_its_engine_core_in_a_process_of_its_own(monkeypatch):
    """The vllm builder starts the engine core in its own process exactly when the run is asynchronous (k = 0 keeps
    the in-process engine and its by-reference sync), and an in-process engine is refused for k >= 1 by name."""
    import pgzoo.rollout.builders as builders

    built = []
    monkeypatch.setattr(builders, "VLLMEngine", lambda *a, **kw: built.append(kw) or kw)
    for k in (0, 1, 2):
        recipe = recipe_from_dict({"rollout": {"engine": "vllm", "max_staleness": k}})  # validates for every k
        builders.engines.build("vllm", recipe.rollout, "ckpt", seed=0, return_routes=False, world_size=1)
    assert [kw["engine_process"] for kw in built] == [False, True, True]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # several GPU ranks: no per-rank device for vLLM
    with pytest.raises(ConfigError, match=r"max_staleness=2 on 2 GPU ranks.*first GPU.*rollout.engine=transformers"):
        builders.engines.build("vllm", recipe.rollout, "ckpt", seed=0, return_routes=False, world_size=2)
    monkeypatch.undo()

    class InProcess:  # what VLLMEngine(engine_process=False).check_background_generate says, without vLLM
        def check_background_generate(self):
            raise ConfigError("this VLLMEngine runs vLLM's engine core in the trainer's process")

    from pgzoo.models import build_tiny_moe, build_tokenizer
    import pgzoo

    tok = build_tokenizer()
    recipe = recipe_from_dict({"rollout": {"engine": "vllm", "max_staleness": 1}})
    with pytest.raises(ConfigError, match=r"rollout.max_staleness=1: this VLLMEngine runs vLLM's engine core in the "
                                          r"trainer's process"):
        RLModule(build_tiny_moe(len(tok), seed=0), tok, pgzoo.get("minirl"), pgzoo.tasks.get("arithmetic"),
                 InProcess(), recipe)


def test_asynchronous_runs_take_pi_old_from_the_update_forward():
    # one mini-batch: π_θold is θ_s, the weights the update's own forward runs under; N > 1 needs the separate pass
    sync = recipe_from_dict({"rollout": {"engine": "transformers"}})
    async_ = recipe_from_dict({"rollout": {"engine": "transformers", "max_staleness": 2}})
    async_n2 = recipe_from_dict({"rollout": {"engine": "transformers", "max_staleness": 2},
                                 "train": {"num_minibatches": 2}})
    assert not sync.needs_old_logprobs and not async_.needs_old_logprobs and async_n2.needs_old_logprobs
    assert "rows up to 2 versions old, μ = the engine's logprobs of the sampling version" in async_.plan()


# ---------------------------------------------------------------------- the schedule
def _fake_sampled(step: int) -> Sampled:
    ro = Rollouts(prompt_ids=torch.full((2, 1), step), prompt_mask=torch.ones(2, 1, dtype=torch.bool),
                  completion_ids=torch.zeros(2, 1, dtype=torch.long),
                  completion_mask=torch.ones(2, 1, dtype=torch.bool),
                  logprobs=torch.zeros(2, 1), truncated=torch.zeros(2, dtype=torch.bool), group=torch.zeros(2).long())
    return Sampled(ro, [], torch.zeros(2), {})


@pytest.mark.parametrize("k", [1, 2, 3])
def test_schedule_trains_step_s_on_version_s_minus_k_whatever_the_timing(k):
    """The loop's calls (take, launch, wait before each sync), with a sampler slower than the update: every step is
    sampled by version max(0, s - k), exactly once, and only while the engine holds that version."""
    steps, engine_version, sampled = 9, [0], []

    def sample(step):
        held = engine_version[0]
        time.sleep(0.002)
        assert engine_version[0] == held, "the engine's weights changed under a generation"
        sampled.append((step, held))
        return _fake_sampled(step)

    pipe = RolloutPipeline(sample, k, steps)
    for s in range(steps):
        got = pipe.take(s)
        assert got.version == generation_version(s, k) and int(got.sampled.rollouts.prompt_ids[0, 0]) == s
        pipe.launch(s)
        pipe.wait()  # before the sync
        engine_version[0] = s + 1
    pipe.close()
    assert sorted(sampled) == [(s, generation_version(s, k)) for s in range(steps)]


def test_queue_survives_a_checkpoint(tmp_path):
    pipe = RolloutPipeline(_fake_sampled, 2, 10)
    pipe.take(0)
    pipe.launch(0)  # steps 1, 2 by version 0
    pipe.save(tmp_path, rank=0, world_size=1)
    back = RolloutPipeline(lambda s: pytest.fail("a queued step was sampled again"), 2, 10)
    assert back.restore(tmp_path, rank=0, world_size=1, start=1) is None
    assert [back.take(s).version for s in (1, 2)] == [0, 0]
    other = RolloutPipeline(_fake_sampled, 2, 10)
    assert "sampled by 1 ranks" in other.restore(tmp_path, rank=0, world_size=2, start=1)
    assert other.take(1).version == 1  # nothing restored: sampled now, by the current version
    # train.old_policy=sampling needs each queued step's π_θold under its sampling weights: a queue saved without
    # them is not restored; one saved with them comes back with them
    unscored = RolloutPipeline(_fake_sampled, 2, 10)
    assert "train.old_policy=current" in unscored.restore(tmp_path, rank=0, world_size=1, start=1, scored=True)
    assert not unscored.queue
    for j, q in enumerate(pipe.sampled_by(0), start=1):
        q.old_logprobs, q.old_routes = torch.full((2, 1), -float(j)), torch.full((2, 2, 1, 1), j, dtype=torch.int16)
    pipe.save(tmp_path, rank=0, world_size=1)
    scored = RolloutPipeline(lambda s: pytest.fail("a queued step was sampled again"), 2, 10)
    assert scored.restore(tmp_path, rank=0, world_size=1, start=1, scored=True) is None
    for j in (1, 2):
        q = scored.take(j)
        assert torch.equal(q.old_logprobs, torch.full((2, 1), -float(j))) and int(q.old_routes.max()) == j


def test_close_cancels_a_generation_in_flight():
    started, cancelled = threading.Event(), threading.Event()

    class Engine:
        def cancel(self):
            cancelled.set()

    def sample(step):
        if step == 0:
            return _fake_sampled(0)
        started.set()
        assert cancelled.wait(10), "close() did not cancel the generation in flight"
        raise EngineError("generation cancelled")

    pipe = RolloutPipeline(sample, 1, 5, Engine())
    pipe.take(0)
    pipe.launch(0)
    assert started.wait(10)
    pipe.close()  # returns: the cancelled generation's error is not raised by close
    assert cancelled.is_set()


# ---------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return fresh_tiny_checkpoint(tmp_path_factory.mktemp("fresh") / "tiny")


def engine_param(name: str):
    marks = [pytest.mark.slow]
    if name == "vllm":
        marks += [pytest.mark.vllm, pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                                       reason="vllm is not installed")]
    return pytest.param(name, marks=marks)


@pytest.mark.parametrize("engine", [engine_param("transformers"), engine_param("vllm")])
def test_rows_are_at_most_k_versions_old_and_mu_is_the_sampling_weights(engine, ckpt, tmp_path, monkeypatch):
    """k=1 over a whole run: each step's weights are saved before its update (version s), and each row's recorded
    version is s - 1 (0 for steps 0 and 1); rescoring a row with the saved copy of its version gives the objective's μ
    (float32 engine: to round-off), while the current weights do not; π_θold is the current weights'. With vLLM the
    engine core runs in its own process (checked) and rollout.verify_sync holds after every sync."""
    from pgzoo.models.logprobs import completion_logprobs

    seen, batches = [], []
    real = RLModule.update

    def spy(self, data, **kw):
        weights = {k: v.detach().clone() for k, v in self.policy.state_dict().items()}
        batches.clear()
        metrics = real(self, data, **kw)
        assert all(b["old_logprobs"] is None for b in batches)  # one mini-batch: π_θold = the update's π_θ
        lp = torch.cat([b["logprobs"].detach() for b in batches])
        seen.append((self.last_step + 1, weights, data, lp[:, :data.completion_ids.shape[1]]))
        return metrics

    real_batch = module_mod.TokenBatch
    monkeypatch.setattr(module_mod, "TokenBatch", lambda **kw: batches.append(kw) or real_batch(**kw))
    monkeypatch.setattr(RLModule, "update", spy)
    engines = []
    real_build = train_mod.build_engine
    monkeypatch.setattr(train_mod, "build_engine", lambda r, p: engines.append(real_build(r, p)) or engines[-1])
    steps = 4
    res = train_mod.train(load_recipe(RECIPE, overrides(ckpt, tmp_path / "run", f"train.steps={steps}",
                                                        "rollout.max_staleness=1", f"rollout.engine={engine}",
                                                        "rollout.verify_sync=1e-5")), quiet=True)
    if engine == "vllm":
        assert engines[0].engine_process
        assert all(row["sync/logprob_abs_diff_mean"] <= 1e-5 for row in res.history)
    assert [s for s, *_ in seen] == list(range(steps))
    versions = {s: data.versions for s, _, data, _ in seen}
    for s, v in versions.items():
        assert v.shape == (16,) and int(v.min()) == int(v.max()) == max(0, s - 1)
        assert 0 <= s - int(v.max()) <= 1
        row = res.history[s]
        assert row["staleness/max"] == s - int(v.max()) and row["staleness/mean"] == s - int(v.max())
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt).eval()
    weights = {s: w for s, w, *_ in seen}
    for s, _, data, update_logprobs in seen:
        m = data.completion_mask

        def rescore(version):
            model.load_state_dict(weights[version])
            with torch.no_grad():
                return completion_logprobs(model, data.prompt_ids, data.prompt_mask, data.completion_ids, m).logprobs

        gap = lambda a, b: float(((a - b).abs() * m).sum() / m.sum())  # noqa: E731
        assert gap(rescore(int(data.versions[0])), data.rollout_logprobs) < 1e-5, s
        assert gap(rescore(s), update_logprobs) < 1e-5, s  # π_θold: the weights this step updates
        if s >= 2:  # stale rows: the current weights are not the ones that sampled them
            assert gap(rescore(s), data.rollout_logprobs) > 1e-4, s
    # the checkpoint holds the rollouts queued for the next step (none after the last)
    assert (res.checkpoint / ROLLOUTS_DIR / "rank-00000.pt").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("old_policy", ["current", "sampling"])
def test_engine_dies_then_resume_continues_exactly(old_policy, ckpt, tmp_path, monkeypatch):
    """k=1: the engine fails in the background generation of step 3 (its 4th call), the run stops naming the intact
    checkpoint of step 2 (whose queued rollouts of step 2 were sampled by version 1); --resume takes those rollouts
    back (with train.old_policy=sampling, with their π_θold under version 1, whose weights are gone) and ends with
    the uninterrupted run's rows and weights."""
    steps = ["train.steps=4", "output.checkpoint_every=2", "rollout.max_staleness=1",
             f"train.old_policy={old_policy}"]
    full = train_mod.train(load_recipe(RECIPE, overrides(ckpt, tmp_path / "full", *steps)), quiet=True)

    crash = load_recipe(RECIPE, overrides(ckpt, tmp_path / "crash", *steps))
    real = train_mod.build_engine
    monkeypatch.setattr(train_mod, "build_engine", lambda r, p: DyingEngine(real(r, p), die_at=4))
    with pytest.raises(EngineError, match=r"failed at step 3.*engine core died.*step-000002.*intact.*--resume"):
        train_mod.train(crash, quiet=True, command="pgzoo train x.yaml")
    monkeypatch.setattr(train_mod, "build_engine", real)
    resumed = train_mod.train(crash, resume=True, quiet=True)

    assert [r["step"] for r in resumed.history] == [0, 1, 2, 3]
    assert_same_rows(full.history, resumed.history)
    from safetensors.torch import load_file

    wa, wb = (load_file(r.checkpoint / "model.safetensors") for r in (full, resumed))
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-6
