"""Streaming weight sync (pgzoo.rollout.sync): names, buckets, memory release, PEFT LoRA effective weights, and a
two-process FSDP2 policy synced into the transformers engine."""

from __future__ import annotations

import copy
import gc
import json
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

from pgzoo.errors import ConfigError, EngineError
from pgzoo.models import build_tiny_moe, build_tokenizer
from pgzoo.rollout import TransformersEngine, check_sync
from pgzoo.rollout.sync import iter_sync_buckets, iter_sync_tensors, prepare_sync, sync_plan, sync_weights

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROMPTS = [[1, 20, 21, 22, 23, 24], [1, 30, 31], [1, 40, 41, 42, 43, 44, 45, 46, 47], [1, 50, 51, 52]]
HERE = Path(__file__).resolve().parent
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def vocab():
    return len(build_tokenizer())


@pytest.fixture(scope="module")
def base(vocab):
    return build_tiny_moe(vocab, seed=0)


def lora_policy(model, *, experts=True, dropout=0.0, modules_to_save=None, seed=1):
    """A PEFT LoRA policy on attention (and the MoE experts and router) with a non-zero B: a trained adapter."""
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q_proj", "v_proj", "o_proj"],
                          target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"]
                          if experts else None, modules_to_save=modules_to_save)
    policy = peft.get_peft_model(copy.deepcopy(model), cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            elif "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return policy


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- names and buckets -------------------------------------------------------------------------------------------
def test_checkpoint_names_are_what_save_pretrained_writes(tmp_path, base):
    from safetensors.torch import load_file

    base.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "model.safetensors"))
    streamed = dict(iter_sync_tensors(base, names="checkpoint"))
    assert set(saved) <= set(streamed) <= set(saved) | {"lm_head.weight"}  # a tied head may come along
    assert any(".experts.0.gate_proj.weight" in k for k in streamed)  # per-expert, not fused
    for k in saved:
        assert torch.equal(streamed[k], saved[k]), k
    assert [(n, tuple(t.shape)) for n, t in iter_sync_tensors(base, "checkpoint")] == \
           [(n, s) for n, s, _ in sync_plan(base, "checkpoint")]
    module = dict(iter_sync_tensors(base, names="module"))
    assert module.keys() == base.state_dict().keys()
    with pytest.raises(ConfigError, match="names="):
        next(iter_sync_tensors(base, names="hf"))


@pytest.mark.parametrize("bucket_mb", [0.05, 0.25, 1.0, 64.0])
def test_buckets_respect_the_limit_and_cover_every_tensor(base, bucket_mb):
    limit = int(bucket_mb * 2**20)
    largest = max(p.numel() * p.element_size() for p in base.state_dict().values())
    seen, buckets = [], 0
    for bucket in iter_sync_buckets(base, bucket_mb, names="checkpoint"):
        size = sum(t.numel() * t.element_size() for _, t in bucket)
        assert size <= max(limit, largest)  # a parameter larger than the bucket travels alone
        seen += [n for n, _ in bucket]
        buckets += 1
    assert seen == [n for n, _ in iter_sync_tensors(base, "checkpoint")]
    total = sum(p.numel() * p.element_size() for p in base.state_dict().values())
    assert buckets >= total // max(limit, largest)


def test_a_bucket_is_released_before_the_next_parameter_is_gathered(base):
    """The generator keeps no reference to a bucket once the consumer moved on: converted expert tensors (new
    storage) of bucket k are freed before bucket k+1 exists."""
    refs, checked = [], 0
    for bucket in iter_sync_buckets(base, 0.05, names="checkpoint"):
        # A full collection costs ~0.4 s in a test session's heap and there are ~30 buckets: collect only when
        # reference counting has not already freed the previous bucket (the same check, it just skips a no-op).
        if any(r() is not None for r in refs):
            gc.collect()
        assert all(r() is None for r in refs), "a previous bucket is still alive"
        checked += len(refs)
        refs = [weakref.ref(t) for n, t in bucket if ".experts." in n]
        del bucket
    assert checked >= 4 * 8 * 3  # every expert tensor of every layer was seen freed


def test_sync_weights_checks_before_anything_moves(base, vocab):
    engine = TransformersEngine(base)
    before = snapshot(engine.model)
    with pytest.raises(ConfigError, match="bucket_mb"):
        sync_weights(base, engine, bucket_mb=0)
    with pytest.raises(ConfigError, match="bucket_mb"):
        sync_weights(base, engine, bucket_mb=True)
    with pytest.raises(EngineError, match="load_weight_buckets"):
        sync_weights(base, object())
    bad = copy.deepcopy(base)
    with torch.no_grad():
        bad.model.layers[2].self_attn.q_proj.weight[0, 0] = float("nan")
        bad.model.layers[0].mlp.experts.gate_up_proj.add_(1.0)
    with pytest.raises(EngineError, match="non-finite"):
        sync_weights(bad, engine)
    other = build_tiny_moe(vocab, seed=0, hidden_size=64)
    with pytest.raises(EngineError, match="shape mismatch"):
        sync_weights(other, engine)
    after = snapshot(engine.model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing was written
    stats = sync_weights(base, engine, bucket_mb=0.1)
    assert stats.buckets > 1 and stats.max_bucket_bytes <= max(stats.bucket_bytes, stats.max_param_bytes)


def test_prepare_sync_checks_now_and_streams_the_weights_as_they_are_when_called(base, vocab):
    """The checks raise from prepare_sync itself (nothing moves); the stream, called later, sends the parameters as
    they are then, and its stats are sync_weights' stats."""
    engine = TransformersEngine(base)
    bad = copy.deepcopy(base)
    with torch.no_grad():
        bad.model.layers[1].self_attn.o_proj.weight[0, 0] = float("inf")
    with pytest.raises(EngineError, match="non-finite"):
        prepare_sync(bad, engine)
    with pytest.raises(EngineError, match="shape mismatch"):
        prepare_sync(build_tiny_moe(vocab, seed=0, hidden_size=64), engine)
    policy = copy.deepcopy(base)
    stream = prepare_sync(policy, engine, bucket_mb=0.1)
    with torch.no_grad():  # a change after the checks, before the stream runs: the stream sends it
        policy.model.layers[0].self_attn.q_proj.weight.mul_(2.0)
    stats = stream()
    after = snapshot(engine.model)
    assert all(torch.equal(after[k], v) for k, v in snapshot(policy).items())
    assert stats.buckets > 1 and stats.tensors == sync_weights(policy, engine, bucket_mb=0.1).tensors


# -- LoRA ---------------------------------------------------------------------------------------------------------
def test_lora_effective_weights_equal_peft_merge(base):
    """W + (α/r)·B·A per adapted module (attention, fused experts, router) equals PEFT's own merge_and_unload."""
    policy = lora_policy(base)
    merged = copy.deepcopy(policy).merge_and_unload().state_dict()
    streamed = dict(iter_sync_tensors(policy, names="module"))
    assert streamed.keys() == merged.keys() == base.state_dict().keys()
    changed = 0
    for k, ref in merged.items():
        torch.testing.assert_close(streamed[k], ref, rtol=0, atol=1e-6)
        changed += not torch.equal(ref, base.state_dict()[k])
    assert changed >= 4 * 6  # q, v, o, gate_up, down and router in each of the 4 layers
    base_only = dict(iter_sync_tensors(policy, names="module", adapters=False))
    assert all(torch.equal(base_only[k], v) for k, v in base.state_dict().items())


@pytest.mark.parametrize("variant", ["attention+experts+router", "dropout", "modules_to_save"])
def test_lora_sync_into_the_transformers_engine(base, vocab, variant):
    model = base
    kwargs = {}
    if variant == "dropout":
        kwargs = dict(experts=False, dropout=0.2)  # PEFT allows dropout on modules, not on raw parameters
    if variant == "modules_to_save":
        model = build_tiny_moe(vocab, seed=0, tie_word_embeddings=False)
        kwargs = dict(modules_to_save=["lm_head"])
    policy = lora_policy(model, **kwargs)
    policy.train()
    engine = TransformersEngine(model)
    assert check_sync(engine, policy, PROMPTS).mean_abs_diff > 1e-3  # the engine still has the base weights
    before = snapshot(policy)
    grads = {k: p.requires_grad for k, p in policy.named_parameters()}
    engine.load_weights(policy)
    after = snapshot(policy)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)  # bit-identical
    assert grads == {k: p.requires_grad for k, p in policy.named_parameters()} and policy.training
    result = check_sync(engine, policy, PROMPTS, tolerance=1e-5)
    assert result.num_tokens > 0 and result.max_abs_diff < 1e-4


def test_a_sync_that_skips_the_adapter_fails_the_check(base):
    policy = lora_policy(base)
    engine = TransformersEngine(base)
    with policy.disable_adapter():  # PEFT's own switch: the policy computes with the base weights here
        engine.load_weights(policy)
        assert check_sync(engine, policy, PROMPTS).mean_abs_diff < 1e-5
    with pytest.raises(EngineError, match="weight sync check failed"):
        check_sync(engine, policy, PROMPTS, tolerance=1e-5)
    sync_weights(policy, engine, adapters=False)
    assert check_sync(engine, policy, PROMPTS).mean_abs_diff > 1e-3
    engine.load_weights(policy)
    assert check_sync(engine, policy, PROMPTS).mean_abs_diff < 1e-5


def test_lora_on_the_router_reaches_the_engine_routes(base):
    """Routing replay with router adapters: the engine's routes (recorded while it samples) equal the LoRA policy's
    own routes on the same tokens, and differ from the base router's."""
    from pgzoo.routing import record

    policy = lora_policy(base, seed=3)
    engine = TransformersEngine(base)
    engine.load_weights(policy)
    ro = engine.generate(PROMPTS, n=2, max_new_tokens=6, temperature=1.0, seed=0, return_routes=True)

    def routes_of(model):
        with torch.no_grad(), record(model) as rec:
            am = ro.attention_mask
            model(input_ids=ro.input_ids, attention_mask=am, position_ids=(am.cumsum(-1) - 1).clamp(min=0))
        return rec.routes

    ran = ro.routes[..., 0] >= 0
    policy.eval()
    assert torch.equal(routes_of(policy)[ran], ro.routes[ran])
    assert not torch.equal(routes_of(base)[ran], ro.routes[ran])


def test_peft_variants_that_are_not_w_plus_ba_are_refused(base):
    policy = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(EngineError, match="DoRA"):
        TransformersEngine(base).load_weights(policy)


# -- FSDP2: two processes -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_fsdp2_shards_stream_into_the_transformers_engine(tmp_path):
    """Two gloo processes, the tiny MoE fully_shard-ed per layer and at the root, local shards moved: after a
    bucketed sync each rank's engine matches the sharded policy (check_sync, all ranks) to float32 round-off."""
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(HERE / "_fsdp_sync_worker.py"), "--engine", "transformers",
                           "--model", "tiny", "--bucket-mb", "0.25", "--port", "29531", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank, r in json.loads(out.read_text()).items():
        assert r["before"] > 1e-2, rank  # the engine started from other weights
        assert r["after"] <= 1e-5 and r["after2"] <= 1e-5, rank
        assert r["local_bytes"] <= r["full_bytes"] // 2 + 4096  # the policy really is sharded
        s = r["stats"]
        assert s["buckets"] > 1 and s["max_bucket_bytes"] <= max(s["bucket_bytes"], s["max_param_bytes"])
        assert s["bytes"] >= r["full_bytes"]  # every parameter went (a tied head twice)


@pytest.mark.slow
def test_fsdp2_lora_policy_streams_its_effective_weights(tmp_path):
    """FSDP2 over a PEFT model (frozen base, adapters on attention, fused experts and router, B moved on each
    rank's shard): W + (α/r)·B·A is computed from the shards (DTensor ops in PEFT's get_delta_weight) and gathered,
    and each rank's engine matches the sharded LoRA policy."""
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(HERE / "_fsdp_sync_worker.py"), "--engine", "transformers",
                           "--model", "tiny", "--lora", "--bucket-mb", "0.25", "--port", "29537", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank, r in json.loads(out.read_text()).items():
        assert r["before"] > 1e-2, rank  # the engine has the base weights: the adapter matters
        assert r["after"] <= 1e-5 and r["after2"] <= 1e-5, rank
