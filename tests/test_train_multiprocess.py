"""`pgzoo train` with train.devices=2: two gloo processes on CPU (transformers rollouts) run the tiny recipe; rank 0
writes the run folder and both ranks end with the same weights; a failing rank is one clear error, not a hang."""

from __future__ import annotations

import json
import os
import time

import pytest

import pgzoo.tasks
import pgzoo.train as train_mod
from pgzoo.errors import PgzooError
from pgzoo.recipes import load_recipe

from _train_helpers import RECIPE, DigitFraction, digit_fraction_task, fresh_checkpoint  # noqa: F401

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return fresh_checkpoint(tmp_path_factory.mktemp("fresh") / "tiny")


def _overrides(ckpt, out, *extra):
    # the digit-fraction test task is registered in this process only: the launcher hands it to the ranks
    return [f"model.path={ckpt}", "rollout.engine=transformers", "task.name=digit-fraction-test",
            "rollout.prompts_per_step=4", "rollout.group_size=2", "rollout.max_new_tokens=4", "train.lr=3e-3",
            "train.devices=2", "eval.before=false", "eval.after=true", "eval.num_problems=4",
            "output.progress_bar=false", "output.plots=false", f"output.dir={out}", *extra]


def test_two_processes_train_and_agree(ckpt, tmp_path):
    out = tmp_path / "run"
    recipe = load_recipe(RECIPE, _overrides(ckpt, out, "train.steps=2", "output.checkpoint_every=1"))
    res = train_mod.train(recipe, quiet=True)
    assert [r["step"] for r in res.history] == [0, 1]
    assert (out / "metrics.csv").read_text().count("\n") == 3  # header + 2 steps, written once (rank 0)
    assert res.checkpoint.name == "step-000002"
    assert "greedy_accuracy" in json.loads((out / "eval.json").read_text())["after"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["devices"] == 2 and summary["steps"] == 2
    d0, d1 = summary["rank_param_digests"]
    assert d0 == d1  # both ranks took the same update
    # ... and it is the weights rank 0 saved, which moved away from the start
    import transformers

    saved = transformers.AutoModelForCausalLM.from_pretrained(res.checkpoint)
    start = transformers.AutoModelForCausalLM.from_pretrained(ckpt)
    assert train_mod.param_digest(saved) == d0 != train_mod.param_digest(start)

    # --resume: every rank loads the same checkpoint and continues
    more = load_recipe(RECIPE, _overrides(ckpt, out, "train.steps=3", "output.checkpoint_every=1"))
    res2 = train_mod.train(more, resume=True, quiet=True)
    assert [r["step"] for r in res2.history] == [0, 1, 2]
    assert res2.checkpoint.name == "step-000003"
    s2 = json.loads((out / "summary.json").read_text())
    assert len(set(s2["rank_param_digests"])) == 1
    # ... exactly: the same weights as 3 uninterrupted steps
    whole = load_recipe(RECIPE, _overrides(ckpt, tmp_path / "whole", "train.steps=3", "output.checkpoint_every=3",
                                           "eval.after=false"))
    train_mod.train(whole, quiet=True)
    assert json.loads((tmp_path / "whole" / "summary.json").read_text())["rank_param_digests"] == \
        s2["rank_param_digests"]


class RewardDiesOnRank1(DigitFraction):
    """Rank 1's reward raises in the second step (after its 4 rewards of step 0), while rank 0 goes on into the
    step's collectives: without the launcher stopping it, rank 0 would wait there forever."""

    name = "reward-dies-on-rank-1-test"
    calls = 0

    def reward(self, completion, problem):
        type(self).calls += 1
        if os.environ.get("RANK") == "1" and type(self).calls > 4:
            raise ValueError("reward server unreachable (simulated)")
        return super().reward(completion, problem)


def test_a_failing_rank_is_one_clear_error_not_a_hang(ckpt, tmp_path):
    pgzoo.tasks.register(RewardDiesOnRank1.name, override=True)(RewardDiesOnRank1)
    try:
        recipe = load_recipe(RECIPE, _overrides(ckpt, tmp_path / "run", "train.steps=3", "output.checkpoint_every=1",
                                                f"task.name={RewardDiesOnRank1.name}"))
        t0 = time.perf_counter()
        with pytest.raises(PgzooError, match=r"rank 1 of 2 failed: PgzooError: the reward function .* raised "
                                             r"ValueError: reward server unreachable \(simulated\) at step 1") as err:
            train_mod.train(recipe, quiet=True)
        assert time.perf_counter() - t0 < 40
        assert "other ranks were stopped" in str(err.value)
        assert "ValueError: reward server unreachable" in (tmp_path / "run" / "rank-1-error.txt").read_text()
    finally:
        pgzoo.tasks.unregister(RewardDiesOnRank1.name)


def test_cli_reports_a_failing_rank_in_one_line(ckpt, tmp_path, capsys):
    from pgzoo.cli import main

    pgzoo.tasks.register(RewardDiesOnRank1.name, override=True)(RewardDiesOnRank1)
    try:
        args = _overrides(ckpt, tmp_path / "run", "train.steps=2", f"task.name={RewardDiesOnRank1.name}")
        assert main(["train", str(RECIPE), *args, "--quiet"]) == 2
    finally:
        pgzoo.tasks.unregister(RewardDiesOnRank1.name)
    err = capsys.readouterr().err
    assert err.startswith("pgzoo: error: rank 1 of 2 failed: ") and "Traceback" not in err
