"""Shared helpers of the trainer tests: a fresh tiny checkpoint and a task with a dense reward (so a few steps move
the weights even from random initialisation)."""

from __future__ import annotations

from pathlib import Path

import pytest

import pgzoo.tasks
from pgzoo.tasks import ArithmeticTask

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny" / "minirl.yaml"
VOLATILE = ("time/", "throughput/")


class DigitFraction(ArithmeticTask):
    """Arithmetic prompts; reward = share of digit characters in the completion (dense, so advantages vary)."""

    name = "digit-fraction-test"

    def reward(self, completion, problem):
        return sum(c.isdigit() for c in completion) / max(len(completion), 1)


@pytest.fixture(autouse=True, scope="module")
def digit_fraction_task():
    """Registers the test task for the importing module's tests only (no leak into other areas' registry tests)."""
    pgzoo.tasks.register("digit-fraction-test", override=True)(DigitFraction)
    yield DigitFraction
    pgzoo.tasks.unregister("digit-fraction-test")


def dense_task_plugin(folder: Path) -> str:
    """A ``PYTHONPATH`` under which a `pgzoo train` child finds ``task.name=digit-fraction-test`` through the
    ``pgzoo.tasks`` entry-point group (as an installed plugin would register it): a fresh tiny model never answers the
    arithmetic task, so its rewards, advantages and gradients are all 0, and a multi-rank run would match a
    one-process run trivially; this task's reward is dense."""
    import os

    info = Path(folder) / "pgzoo_test_tasks-0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pgzoo-test-tasks\nVersion: 0\n")
    (info / "entry_points.txt").write_text("[pgzoo.tasks]\ndigit-fraction-test = _train_helpers:DigitFraction\n")
    return os.pathsep.join([str(folder), str(Path(__file__).resolve().parent)])


def subprocess_env(**extra: str) -> dict[str, str]:
    """This process's environment for a `pgzoo train` child, without the torch.distributed variables code in the test
    process may have set (the child would take itself for one rank of a group that never forms), plus ``extra``."""
    import os

    from conftest import DIST_ENV

    return {**{k: v for k, v in os.environ.items() if k not in DIST_ENV}, **extra}


class DyingEngine:
    """Wraps an engine; its generate raises on the ``die_at``-th call (an engine crash mid-run)."""

    def __init__(self, inner, die_at):
        self.inner, self.die_at, self.calls = inner, die_at, 0
        self.supports_routes = inner.supports_routes

    def generate(self, *a, **k):
        self.calls += 1
        if self.calls == self.die_at:
            raise RuntimeError("engine core died (simulated)")
        return self.inner.generate(*a, **k)

    def load_weights(self, model):
        self.inner.load_weights(model)

    def close(self):
        self.inner.close()


def overrides(ckpt: Path, out: Path, *extra: str) -> list[str]:
    return [f"model.path={ckpt}", "rollout.engine=transformers", "task.name=digit-fraction-test",
            "rollout.prompts_per_step=4", "rollout.group_size=4", "rollout.max_new_tokens=6", "train.lr=3e-3",
            "eval.before=false", "eval.after=false", "output.progress_bar=false", "output.plots=false",
            f"output.dir={out}", *extra]


def stable(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(VOLATILE)}


def train_steps(run_dir: Path) -> list[int]:
    """The global steps a run folder's ``metrics.csv`` holds training rows for (evaluation rows left out)."""
    from pgzoo.adapters.lightning.run_folder import read_metrics

    return [int(r["step"]) for r in read_metrics(Path(run_dir) / "metrics.csv") if "reward/mean" in r]


def wait_for(proc, done, timeout: float = 240) -> None:
    """Poll ``done()`` while the process ``proc`` runs; fail with its output if it exits or ``timeout`` passes."""
    import time

    deadline = time.monotonic() + timeout
    while not done():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.2)


def child_pid(parent: int, marker: bytes, timeout: float = 0) -> int:
    """The pid of the child of ``parent`` whose environment holds ``marker`` (e.g. ``b"LOCAL_RANK=1"``), waiting up
    to ``timeout`` seconds for it to appear. /proc/PID/stat is read after its last ``)``: a command name may hold
    spaces and parentheses, which shift the fields of a plain split."""
    import os
    import time

    deadline = time.monotonic() + timeout
    while True:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if int(stat[1]) == parent and marker in env:
                return int(pid)
        if time.monotonic() >= deadline:
            raise AssertionError(f"no child of {parent} with {marker.decode()} in its environment")
        time.sleep(0.2)


def assert_same_rows(expected: list[dict], got: list[dict]) -> None:
    """Two runs' metric rows agree step by step (the stable keys; float tolerance of a resumed run)."""
    assert len(expected) == len(got)
    for a, b in zip(expected, got):
        a, b = stable(a), stable(b)
        assert a.keys() == b.keys()
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (a["step"], k)


def poison_grad_norm(monkeypatch, from_step: int = 2) -> None:
    """Every step from ``from_step`` on reports grad_norm = NaN after its update (a divergence the guards must
    catch), with the update itself untouched."""
    import math

    from pgzoo.adapters.lightning.module import RLModule

    real = RLModule.update

    def poisoned(self, data, **kw):
        metrics = real(self, data, **kw)
        if self.last_step + 1 >= from_step:
            metrics["grad_norm"] = math.nan
        return metrics

    monkeypatch.setattr(RLModule, "update", poisoned)
