"""Asynchronous runs (``rollout.max_staleness=1``, transformers engine, tiny MoE) with the settings docs/training.md's
table says run asynchronously, each checked against what it must compute rather than only that it runs:

- R3 replays, for every row, the routes the engine recorded while sampling it: recording a saved copy of the
  sampling version's weights (s - 1) over the row gives exactly those routes, and the current weights' (s) differ;
- R2 records its routes in the old-logprob pass under the current weights (s), not the sampling ones, and its
  π_θold is the current weights' rescoring;
- LoRA syncs the effective weights W + (α/r)·B·A at each step boundary: ``rollout.verify_sync`` holds after every
  sync and each row's μ is the rescoring by the merged weights of the version that sampled it;
- a ``train.stop_on`` guard stops the run with the synchronous run's exit status and message, and an engine or
  reward error in the background generation is raised in the trainer naming the step it sampled; in both cases the
  background thread is gone afterwards.
"""

from __future__ import annotations

import threading

import pytest
import torch

import pgzoo.adapters.lightning.module as module_mod
import pgzoo.adapters.lightning.run as train_mod
import pgzoo.routing as routing
import pgzoo.routing.trainer as routing_trainer
from pgzoo.adapters.lightning.module import RLModule
from pgzoo.errors import ConfigError, EngineError, PgzooError
from pgzoo.models.logprobs import completion_logprobs, position_ids_from_mask
from pgzoo.recipes import load_recipe

from pgzoo.models import fresh_tiny_checkpoint
from _train_helpers import (RECIPE, DigitFraction, DyingEngine, digit_fraction_task,  # noqa: F401
                            overrides, poison_grad_norm)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ASYNC = ["rollout.max_staleness=1"]
ROLLOUT_THREAD = "pgzoo-rollout"  # RolloutPipeline's thread name prefix


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return fresh_tiny_checkpoint(tmp_path_factory.mktemp("fresh") / "tiny")


@pytest.fixture(scope="module")
def scorer(ckpt):
    """A plain transformers copy of the tiny MoE into which a saved version's weights are loaded for rescoring."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(ckpt).eval()


def rollout_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(ROLLOUT_THREAD) and t.is_alive()]


class Step:
    """What one global step's update saw: the version it trains (its weights, saved before the update), its rows,
    the TokenBatch fields of its micro-batches, the routes its update passes replayed, the stored R2 routes."""

    def __init__(self, step, weights, data):
        self.step, self.weights, self.data = step, weights, data
        self.batches, self.replayed, self.stored = [], [], None
        self.thread_alive = bool(rollout_threads())

    def field(self, name):
        width = self.data.completion_ids.shape[1]
        return torch.cat([b[name].detach() for b in self.batches])[:, :width]


def spy_steps(monkeypatch, weights_of=lambda module: module.policy.state_dict()):
    """Record a :class:`Step` per call of ``RLModule.update``; ``weights_of(module)`` gives the weights to save."""
    steps: list[Step] = []
    real_update, real_batch, real_replay = RLModule.update, module_mod.TokenBatch, routing_trainer.replay

    def update(self, data, **kw):
        steps.append(Step(self.last_step + 1, {k: v.detach().clone() for k, v in weights_of(self).items()}, data))
        metrics = real_update(self, data, **kw)
        steps[-1].stored = None if self.replay.routes is None else self.replay.routes.clone()
        return metrics

    def token_batch(**kw):
        steps[-1].batches.append(kw)
        return real_batch(**kw)

    def replay(model, routes, **kw):
        steps[-1].replayed.append(routes.detach().clone())
        return real_replay(model, routes, **kw)

    monkeypatch.setattr(RLModule, "update", update)
    monkeypatch.setattr(module_mod, "TokenBatch", token_batch)
    monkeypatch.setattr(routing_trainer, "replay", replay)
    return steps


def rescore(model, weights, data) -> torch.Tensor:
    model.load_state_dict(weights)
    with torch.no_grad():
        return completion_logprobs(model, data.prompt_ids, data.prompt_mask, data.completion_ids,
                                   data.completion_mask).logprobs


def recorded_routes(model, weights, data) -> torch.Tensor:
    """``[N, P+T, L, k]``: the routes of ``weights`` over the rows' prompt + completion, one full forward, positions
    numbered as the engine numbers them (left padding skipped)."""
    model.load_state_dict(weights)
    ids = torch.cat([data.prompt_ids, data.completion_ids], 1)
    am = torch.cat([data.prompt_mask, data.completion_mask], 1).long()
    with torch.no_grad(), routing.record(model) as rec:
        model(input_ids=ids, attention_mask=am, position_ids=position_ids_from_mask(am))
    return rec.routes


def fed_completion_tokens(data) -> torch.Tensor:
    """bool ``[N, T]``: completion tokens the engine fed back through the model (it never feeds a row's last
    sampled token while it ends the loop, so that position has no recorded route)."""
    P = data.prompt_ids.shape[1]
    fed = data.completion_mask & (data.routes[:, P:, 0, 0] != routing.UNROUTED)
    assert int(fed.sum()) >= int(data.completion_mask.sum()) - len(fed) > 0  # at most the last token of a row
    return fed


def gap(a, b, mask) -> float:
    return float(((a - b).abs() * mask).sum() / mask.sum())


def run(ckpt, out, *extra):
    return train_mod.train(load_recipe(RECIPE, overrides(ckpt, out, "train.steps=4", *ASYNC, *extra)), quiet=True)


# ---------------------------------------------------------------------- routing replay
def test_r3_replays_the_routes_of_the_version_that_sampled_each_row(ckpt, scorer, tmp_path, monkeypatch):
    """Step s >= 2 trains rows sampled by version s - 1. The routes its update replays are the engine's recorded
    routes of those rows, and recording the saved weights of version s - 1 over the rows (one full forward, no KV
    cache) gives exactly them on every fed completion token; version s's weights route some of them elsewhere.
    Exact, not up to near-ties: float32 on CPU, the KV-cached loop and the full forward differ in router logits by far
    less than the gap between the k-th and (k+1)-th logit, whose smallest value over these rows is 4.7e-5."""
    steps = spy_steps(monkeypatch)
    res = run(ckpt, tmp_path / "r3", "train.routing_replay=R3")
    assert [st.step for st in steps] == [0, 1, 2, 3]
    for row in res.history:
        assert row["routing/layers_hit"] == row["routing/num_moe_layers"] == 4
    weights = {st.step: st.weights for st in steps}
    moved = 0
    for st in steps:
        data, P = st.data, st.data.prompt_ids.shape[1]
        version = int(data.versions[0])
        assert version == max(0, st.step - 1)
        replayed = torch.cat(st.replayed)  # the single mini-batch's update pass: every row, in order
        assert torch.equal(replayed, data.routes.long())
        fed = fed_completion_tokens(data)
        sampling = recorded_routes(scorer, weights[version], data)[:, P:]
        assert torch.equal(sampling[fed], data.routes[:, P:][fed].long()), st.step
        if st.step >= 2:  # the current weights are not the ones that routed the rows
            current = recorded_routes(scorer, st.weights, data)[:, P:]
            moved += int((current[fed] != sampling[fed]).any(-1).any(-1).sum())
    assert moved > 0


def test_r2_records_routes_under_the_current_weights(ckpt, scorer, tmp_path, monkeypatch):
    """R2 runs the old-logprob pass asynchronously too (one mini-batch): it records the routes of version s, the
    weights being updated (the update passes replay those), and its π_θold is version s's rescoring of the rows, not
    the sampling version's (μ, the engine's logprobs of version s - 1)."""
    steps = spy_steps(monkeypatch)
    res = run(ckpt, tmp_path / "r2", "train.routing_replay=R2")
    assert load_recipe(RECIPE, overrides(ckpt, tmp_path, *ASYNC, "train.routing_replay=R2")).needs_old_logprobs
    assert [st.step for st in steps] == [0, 1, 2, 3]
    for row in res.history:
        assert row["routing/layers_hit"] == row["routing/num_moe_layers"] == 4
        assert row["time/old_logprobs"] > 0
    weights = {st.step: st.weights for st in steps}
    moved = 0
    for st in steps:
        data, m = st.data, st.data.completion_mask
        version = int(data.versions[0])
        assert data.routes is None  # R2 asks the engine for none
        current = recorded_routes(scorer, st.weights, data)
        am = torch.cat([data.prompt_mask, data.completion_mask], 1)
        assert torch.equal(st.stored.long()[am], current[am]), st.step  # recorded in the old pass, under θ_s
        assert torch.equal(torch.cat(st.replayed), st.stored.long())  # and replayed by the update
        old = st.field("old_logprobs")
        assert gap(old, rescore(scorer, st.weights, data), m) < 1e-6, st.step
        assert gap(rescore(scorer, weights[version], data), data.rollout_logprobs, m) < 1e-5, st.step  # μ
        if st.step >= 2:
            sampling = recorded_routes(scorer, weights[version], data)
            moved += int((sampling[am] != current[am]).any(-1).any(-1).sum())
            assert gap(old, data.rollout_logprobs, m) > 1e-4, st.step
    assert moved > 0


# ---------------------------------------------------------------------- train.old_policy: sampling
@pytest.mark.parametrize("k", [1, 2])
def test_old_policy_sampling_scores_each_row_under_the_weights_that_sampled_it(k, ckpt, scorer, tmp_path,
                                                                               monkeypatch):
    """``train.old_policy=sampling``: each step's π_θold is the training engine's rescoring of its rows under the
    saved weights of the version that sampled them (s - k), not the current weights (s), so the clip acts on the
    staleness: with one mini-batch r = π_θ/π_θold is no longer 1 on stale steps. μ is unchanged (the engine's)."""
    steps = spy_steps(monkeypatch)
    res = run(ckpt, tmp_path / f"k{k}", "train.old_policy=sampling", f"rollout.max_staleness={k}",
              "train.steps=5")
    weights = {st.step: st.weights for st in steps}
    assert [st.step for st in steps] == [0, 1, 2, 3, 4]
    clipped = 0.0
    for st, row in zip(steps, res.history):
        data, m = st.data, st.data.completion_mask
        version = int(data.versions[0])
        assert version == max(0, st.step - k)
        old = st.field("old_logprobs") if st.batches[0]["old_logprobs"] is not None else None
        if version == st.step:  # sampled by the current weights (step 0): π_θold = π_θ detached, as synchronously
            assert old is None and row["first_order/gap_staleness"] == 0.0
            continue
        assert gap(old, rescore(scorer, weights[version], data), m) < 1e-6, st.step
        assert gap(old, rescore(scorer, st.weights, data), m) > 1e-4, st.step  # not the current weights'
        assert gap(data.rollout_logprobs, rescore(scorer, weights[version], data), m) < 1e-5, st.step  # μ
        assert row["first_order/gap_staleness"] > 0
        clipped += row["clip/fraction"]
    assert clipped > 0  # the clip bounds the staleness (it never acts with train.old_policy=current and N = 1)


def test_old_policy_sampling_with_r2_replays_the_sampling_weights_routes(ckpt, scorer, tmp_path, monkeypatch):
    """R2 with ``train.old_policy=sampling`` records its routes in the pass under the sampling version's weights
    (the paper's θ_old) and the update replays exactly those; no old-logprob pass runs in the step itself."""
    steps = spy_steps(monkeypatch)
    res = run(ckpt, tmp_path / "r2", "train.old_policy=sampling", "train.routing_replay=R2")
    weights = {st.step: st.weights for st in steps}
    moved = 0
    for st, row in zip(steps, res.history):
        assert row["routing/layers_hit"] == row["routing/num_moe_layers"] == 4
        data = st.data
        version = int(data.versions[0])
        am = torch.cat([data.prompt_mask, data.completion_mask], 1)
        sampling = recorded_routes(scorer, weights[version], data)
        assert torch.equal(st.stored.long()[am], sampling[am]), st.step
        assert torch.equal(torch.cat(st.replayed), st.stored.long())
        assert gap(st.field("old_logprobs"), rescore(scorer, weights[version], data), data.completion_mask) < 1e-6
        if version < st.step:
            current = recorded_routes(scorer, st.weights, data)
            moved += int((sampling[am] != current[am]).any(-1).any(-1).sum())
    assert moved > 0  # the current weights would have routed some tokens elsewhere


def test_old_policy_is_strict_and_changes_nothing_synchronously(ckpt, tmp_path):
    """A value other than current/sampling is refused naming the key; synchronously (k = 0) every row is sampled by
    the weights being updated, so ``sampling`` is ``current``: the same losses, bit for bit."""
    with pytest.raises(ConfigError, match="old_policy"):
        load_recipe(RECIPE, overrides(ckpt, tmp_path, "train.old_policy=behaviour"))
    asynchronous = load_recipe(RECIPE, overrides(ckpt, tmp_path, "train.old_policy=sampling", *ASYNC))
    assert asynchronous.scores_ahead
    assert not load_recipe(RECIPE, overrides(ckpt, tmp_path, "train.old_policy=sampling")).scores_ahead
    assert "π_θold = the training engine under the sampling version" in asynchronous.plan()
    current, sampling = (train_mod.train(load_recipe(RECIPE, overrides(ckpt, tmp_path / name, "train.steps=2",
                                                                       f"train.old_policy={name}")), quiet=True)
                         for name in ("current", "sampling"))
    assert [r["loss"] for r in current.history] == [r["loss"] for r in sampling.history]


# ---------------------------------------------------------------------- LoRA
def test_lora_mu_is_the_merged_weights_of_the_sampling_version(ckpt, scorer, tmp_path, monkeypatch):
    """With ``model.lora`` the engine gets the effective weights at every step boundary: ``verify_sync`` holds after
    each of the 4 syncs, and each row's μ is the rescoring by the merged weights W + (α/r)·B·A of version s - 1 (the
    one that sampled it), to float32 round-off, while version s's merged weights give other numbers."""
    pytest.importorskip("peft")
    from pgzoo.adapters.lightning.lora import effective_state_dict

    from test_train_lora import LORA

    steps = spy_steps(monkeypatch, weights_of=lambda module: effective_state_dict(module.policy))
    res = run(ckpt, tmp_path / "lora", *LORA, "rollout.verify_sync=1e-5")
    assert [st.step for st in steps] == [0, 1, 2, 3]
    assert all(row["sync/logprob_abs_diff_mean"] <= 1e-5 for row in res.history) and len(res.history) == 4
    weights = {st.step: st.weights for st in steps}
    assert weights[0].keys() == scorer.state_dict().keys()  # merged: the base model's names, no adapter keys
    for st in steps:
        data, m = st.data, st.data.completion_mask
        version = int(data.versions[0])
        assert version == max(0, st.step - 1)
        assert gap(rescore(scorer, weights[version], data), data.rollout_logprobs, m) < 1e-5, st.step
        if st.step >= 2:
            assert gap(rescore(scorer, st.weights, data), data.rollout_logprobs, m) > 1e-4, st.step


# ---------------------------------------------------------------------- guards and errors
def test_a_tripped_guard_stops_as_synchronously_and_the_thread_ends(ckpt, tmp_path, monkeypatch, capsys):
    """``train.stop_on.nonfinite`` trips at step 2 (grad_norm poisoned after the update): ``pgzoo train`` exits with
    the synchronous run's status and message (run folder aside), the step-2 checkpoint is the newest, and no
    background thread is left (one was alive during the run)."""
    from pgzoo.cli.main import main

    steps = spy_steps(monkeypatch)
    poison_grad_norm(monkeypatch, from_step=2)
    outcome = {}
    for name, extra in [("sync", []), ("async", ASYNC)]:
        out = tmp_path / name
        argv = ["train", str(RECIPE), *overrides(ckpt, out, "train.steps=4", "output.checkpoint_every=1",
                                                 "output.keep_checkpoints=5", *extra)]
        steps.clear()
        status = main(argv)
        err = capsys.readouterr().err.strip().splitlines()[-1]
        outcome[name] = (status, err.replace(str(out), "RUN").replace(" rollout.max_staleness=1", ""))
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
        assert [st.step for st in steps] == [0, 1, 2]
        assert any(st.thread_alive for st in steps) == (name == "async")
        assert rollout_threads() == []
    assert outcome["async"] == outcome["sync"]
    status, err = outcome["async"]
    assert status == 2 and "step 2: grad_norm=nan (train.stop_on.nonfinite)" in err
    assert "(RUN/checkpoints/step-000002) is intact" in err


@pytest.mark.parametrize("where", ["engine", "reward"])
def test_a_background_error_is_raised_in_the_trainer_naming_the_step_it_sampled(where, ckpt, tmp_path,
                                                                                monkeypatch):
    """Step 2's rows are sampled in the background during step 1. The engine (its 3rd generate) or the task's reward
    (its 33rd call: the first of step 2) fails there; the trainer raises at step 1's wait, after step 1's update and
    before its sync, naming step 2, with the resume hint; the background thread is gone afterwards."""
    steps, synced = spy_steps(monkeypatch), []
    real_sync = RLModule.sync_engine
    monkeypatch.setattr(RLModule, "sync_engine",
                        lambda self, step, **kw: synced.append(step) or real_sync(self, step, **kw))
    if where == "engine":
        real = train_mod.build_engine
        monkeypatch.setattr(train_mod, "build_engine", lambda r, p: DyingEngine(real(r, p), die_at=3))
        error, match = EngineError, r"failed at step 2: RuntimeError: engine core died \(simulated\)"
    else:
        calls, real_reward = [0], DigitFraction.reward

        def reward(self, completion, problem):
            calls[0] += 1
            if calls[0] == 33:
                raise ZeroDivisionError("division by zero")
            return real_reward(self, completion, problem)

        monkeypatch.setattr(DigitFraction, "reward", reward)
        error, match = PgzooError, r"task 'digit-fraction-test' raised ZeroDivisionError: division by zero at step 2 "
    with pytest.raises(error, match=match + r".*No checkpoint had been written yet"):
        run(ckpt, tmp_path / where)
    assert [st.step for st in steps] == [0, 1] and steps[1].thread_alive and synced == [0]
    assert rollout_threads() == []


def _run_recording_syncs(ckpt, out, monkeypatch, *extra):
    """A k=1 run of 4 steps whose engine takes 0.2 s before reading each sync's buckets (a slow transfer); returns
    the run, the weights after each update, and per sync its thread and the tensors the engine read."""
    after, syncs = [], []
    real_update = RLModule.update

    def update(self, data, **kw):
        metrics = real_update(self, data, **kw)
        after.append({k: v.detach().clone() for k, v in self.policy.state_dict().items()})
        return metrics

    def slow(engine):
        real_load = engine.load_weight_buckets

        def load_weight_buckets(buckets):
            import time

            time.sleep(0.2)  # the trainer's next step runs meanwhile: its optimizer step must wait for this
            read = []

            def copies():
                for bucket in buckets:
                    read.extend((n, t.detach().clone()) for n, t in bucket)
                    yield bucket

            real_load(copies())
            syncs.append((threading.current_thread().name, dict(read)))

        engine.load_weight_buckets = load_weight_buckets
        return engine

    monkeypatch.setattr(RLModule, "update", update)
    real_build = train_mod.build_engine
    monkeypatch.setattr(train_mod, "build_engine", lambda r, p: slow(real_build(r, p)))
    res = train_mod.train(load_recipe(RECIPE, overrides(ckpt, out, "train.steps=4", *ASYNC, *extra)), quiet=True)
    monkeypatch.setattr(RLModule, "update", real_update)
    monkeypatch.setattr(train_mod, "build_engine", real_build)
    return res, after, syncs


def test_the_background_sync_sends_each_update_s_weights_and_changes_no_update(ckpt, tmp_path, monkeypatch):
    """Asynchronously the sync after step s streams in the rollout thread while step s + 1 computes; the engine
    reads the weights step s produced (exactly, though it waits 0.2 s before reading and step s + 1's optimizer
    step would change them), and the run's rows and weights equal those of the same run syncing in the trainer's
    thread (``background_sync`` off)."""
    res, after, syncs = _run_recording_syncs(ckpt, tmp_path / "bg", monkeypatch)
    assert [thread.startswith(ROLLOUT_THREAD) for thread, _ in syncs] == [True] * 4
    for s, (_, read) in enumerate(syncs):
        assert read, s
        for name, tensor in read.items():  # the engine's names are the checkpoint's: the tiny MoE keeps them
            assert torch.equal(tensor, after[s][name]), (s, name)
    assert all(row["time/sync_wait"] >= 0.0 for row in res.history)
    assert any(row["time/sync_wait"] > 0.05 for row in res.history[1:])  # an optimizer step did wait for a sync
    # the wait for the next steps' generation is part of the step's sync time
    assert all(0.0 <= row["time/generation_wait"] <= row["time/sync"] for row in res.history)

    monkeypatch.setattr(RLModule, "background_sync", property(lambda self: False))
    fg, fg_after, fg_syncs = _run_recording_syncs(ckpt, tmp_path / "fg", monkeypatch)
    assert [thread for thread, _ in fg_syncs] == ["MainThread"] * 4
    assert [row["time/sync_wait"] for row in fg.history] == [0.0] * 4
    from _train_helpers import stable

    assert [stable(r) for r in fg.history] == [stable(r) for r in res.history]
    assert all(torch.equal(fg_after[-1][k], after[-1][k]) for k in after[-1])


def test_a_sync_that_fails_in_the_background_is_raised_naming_its_step(ckpt, tmp_path, monkeypatch):
    """The engine fails while loading the weights of step 1 in the rollout thread: the trainer raises the engine's
    error at step 2's optimizer step, naming step 1, and the background thread is gone."""
    calls = [0]

    def failing(engine):
        real_load = engine.load_weight_buckets

        def load_weight_buckets(buckets):
            calls[0] += 1
            if calls[0] == 2:
                raise RuntimeError("transfer lost (simulated)")
            real_load(buckets)

        engine.load_weight_buckets = load_weight_buckets
        return engine

    real_build = train_mod.build_engine
    monkeypatch.setattr(train_mod, "build_engine", lambda r, p: failing(real_build(r, p)))
    with pytest.raises(EngineError, match=r"weights of step 1: RuntimeError: transfer lost \(simulated\)"):
        train_mod.train(load_recipe(RECIPE, overrides(ckpt, tmp_path / "run", "train.steps=4", *ASYNC)),
                        quiet=True)
    assert rollout_threads() == []
