"""VLLMEngine weight sync on model variants: a dense Qwen3 and a Qwen3-MoE whose expert intermediate size the CPU
MoE kernel pads (40 -> 64). Each test starts its own engine and closes it (which also shows a second engine can
start in the same process)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from pgzoo.models.tiny import build_tiny_dense, build_tiny_moe, build_tokenizer, save_pretrained

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vllm is not installed (pip install 'pgzoo[cpu]' or 'pgzoo[vllm]')"),
]

PROMPTS = [[1, 20, 21, 22, 23, 24], [1, 30, 31]]


def max_diff(engine, model, seed):
    ro = engine.generate(PROMPTS, n=3, max_new_tokens=10, temperature=0.9, seed=seed)
    am = ro.attention_mask
    with torch.no_grad():
        logits = model(ro.input_ids, attention_mask=am, position_ids=(am.cumsum(-1) - 1).clamp(min=0)).logits
    p = ro.prompt_ids.shape[1]
    ref = torch.log_softmax(logits[:, p - 1: -1].float() / 0.9, -1).gather(-1, ro.completion_ids[..., None])[..., 0]
    return (ro.logprobs - ref).abs()[ro.completion_mask].max().item()


@pytest.mark.parametrize("build,overrides", [
    (build_tiny_dense, {}),
    (build_tiny_moe, {"moe_intermediate_size": 40}),  # CPU MoE kernel pads the intermediate size to 64
], ids=["dense", "moe-padded-experts"])
def test_sync_parity(tmp_path, build, overrides):
    from pgzoo.rollout import VLLMEngine

    tok = build_tokenizer()
    policy = build(len(tok), seed=0, **overrides)
    policy.generation_config.do_sample = True
    save_pretrained(policy, tok, tmp_path / "ckpt")
    with VLLMEngine(tmp_path / "ckpt", dtype="float32") as engine:
        assert max_diff(engine, policy, seed=0) < 1e-5
        for seed in (1, 2):
            new = build(len(tok), seed=seed, **overrides)
            engine.load_weights(new)
            assert max_diff(engine, new, seed=seed) < 1e-5, seed
            assert max_diff(engine, policy, seed=seed) > 1e-2  # no longer the old weights
    with pytest.raises(Exception, match="closed"):
        engine.generate(PROMPTS)


def test_bfloat16_engine_sync_round_trip(tmp_path):
    """A bf16 engine: syncing other weights and then the original ones back reproduces the fresh engine exactly."""
    from pgzoo.rollout import VLLMEngine

    tok = build_tokenizer()
    policy = build_tiny_moe(len(tok), seed=0)
    policy.generation_config.do_sample = True
    save_pretrained(policy, tok, tmp_path / "ckpt")
    with VLLMEngine(tmp_path / "ckpt", dtype="bfloat16") as engine:
        fresh = engine.generate(PROMPTS, n=4, max_new_tokens=10, seed=0)
        assert 1e-5 < max_diff(engine, policy, seed=0) < 0.2  # bf16: a real but small discrepancy
        engine.load_weights(build_tiny_moe(len(tok), seed=3))
        assert max_diff(engine, policy, seed=0) > 0.1
        engine.load_weights(policy)
        back = engine.generate(PROMPTS, n=4, max_new_tokens=10, seed=0)
    assert torch.equal(fresh.completion_ids, back.completion_ids) and torch.equal(fresh.logprobs, back.logprobs)
