"""`benchmarks/gpu_check.py --dry-run` lists the CUDA checks on any machine and runs none of them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_lists_every_check(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--work",
                        str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    for item in ("pytest -q -m cuda", "train.strategy=ddp", "train.strategy=fsdp", "train.routing_replay=R2",
                 "train.routing_replay=R3", "objectives.py --device cuda", "rollout.engine=transformers",
                 "train.steps=10", "--nccl-weight-transfer", "--train-vllm-device"):
        assert item in out, item
    assert out.startswith("gpu_check would run 8 checks")
    assert list(tmp_path.iterdir()) == []  # nothing ran, nothing was written


def test_refuses_to_run_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():  # pragma: no cover - on a GPU machine the real run is gpu_check itself
        return
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--work", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "no CUDA device" in p.stderr


def test_nccl_check_skips_with_the_reason_here(tmp_path):
    """Check 5 on this machine: vLLM's CPU build (or no vLLM, or one GPU) is a skip that names why, not a failure."""
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--nccl-weight-transfer",
                        str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("skipped: ") and ("CPU build" in p.stdout or "not installed" in p.stdout
                                                 or "GPU(s) visible" in p.stdout), p.stdout
