"""Rollouts, the engine protocol, FP8 fake quantisation and TransformersEngine (no vLLM needed).

μ is checked against a naive reference: one full float32 forward over prompt + completion, then
log_softmax(nucleus(logits / T))[token] — computed independently of the engine's KV-cached sampling loop.
"""

from __future__ import annotations

import sys

import pytest
import torch

from pgzoo.errors import ConfigError, DependencyError, EngineError
from pgzoo.models.tiny import build_tiny_dense, build_tiny_moe, build_tokenizer
from pgzoo.rollout import RolloutEngine, Rollouts, TransformersEngine, fake_quantize_fp8, quantize_fp8_tensor
from pgzoo.rollout.base import assemble
from pgzoo.rollout.transformers_engine import multinomial_per_row, top_p_mask

PROMPTS = [[1, 20, 21, 22, 23, 24], [1, 30, 31], [1, 40, 41, 42, 43, 44, 45, 46, 47]]
EOS = 2


@pytest.fixture(scope="module")
def vocab():
    return len(build_tokenizer())


@pytest.fixture(scope="module")
def moe(vocab):
    return build_tiny_moe(vocab, seed=0)


@pytest.fixture(scope="module")
def engine(moe):
    return TransformersEngine(moe)


def naive_nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Reference top-p filter, one row at a time: keep the most probable tokens until their mass reaches top_p."""
    out = torch.full_like(logits, float("-inf"))
    for i, row in enumerate(logits):
        probs = row.softmax(-1)
        mass = 0.0
        for j in probs.argsort(descending=True).tolist():
            out[i, j] = row[j]
            mass += probs[j].item()
            if mass >= top_p - 1e-7:
                break
    return out


def reference_logprobs(model, ro: Rollouts, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """log μ of every completion token from one float32 forward over prompt + completion (0 at padding)."""
    am = ro.attention_mask
    with torch.no_grad():
        logits = model(ro.input_ids, attention_mask=am, position_ids=(am.cumsum(-1) - 1).clamp(min=0)).logits.float()
    p = ro.prompt_ids.shape[1]
    step = logits[:, p - 1: -1]
    if temperature > 0:
        step = step / temperature
        if top_p < 1:
            step = torch.stack([naive_nucleus(row, top_p) for row in step])
    lp = torch.log_softmax(step, -1).gather(-1, ro.completion_ids[..., None]).squeeze(-1)
    return torch.where(ro.completion_mask, lp, torch.zeros_like(lp))


# -- Rollouts -----------------------------------------------------------------------------------------------------
def test_assemble_layout_and_helpers():
    ro = assemble([[5, 6, 7], [8]], 2, [[1, 2], [3], [], [4, 5, 6]], [[-1.0, -2.0], [-3.0], [], [-4.0, -5.0, -6.0]],
                  [False, True, False, True], pad_id=0)
    assert ro.prompt_ids.tolist() == [[5, 6, 7], [5, 6, 7], [0, 0, 8], [0, 0, 8]]
    assert ro.prompt_mask.tolist()[2] == [False, False, True]
    assert ro.completion_ids.tolist() == [[1, 2, 0], [3, 0, 0], [0, 0, 0], [4, 5, 6]]
    assert ro.completion_mask.sum(1).tolist() == [2, 1, 0, 3]
    assert ro.logprobs[3].tolist() == [-4.0, -5.0, -6.0] and ro.logprobs[1, 1:].abs().sum() == 0
    assert ro.group.tolist() == [0, 0, 1, 1] and ro.truncated.tolist() == [False, True, False, True]
    assert ro.input_ids.shape == (4, 6) and ro.attention_mask.dtype == torch.long
    assert ro.completions() == [[1, 2], [3], [], [4, 5, 6]] and ro.num_tokens == 6 and len(ro) == 4
    sub = ro.select([3, 0])
    assert sub.group.tolist() == [1, 0] and sub.completion_ids[0].tolist() == [4, 5, 6]
    masked = ro.select(ro.truncated)
    assert len(masked) == 2 and masked.completions() == [[3], [4, 5, 6]]
    assert len(ro.select(slice(1, 3))) == 2


def test_assemble_routes_alignment():
    # prompt [5, 6] (left-padded to 3), completion [1, 2]; engine ran 3 positions (last token never fed)
    routes = [torch.tensor([[[0, 1]], [[2, 3]], [[4, 5]]]), torch.tensor([[[6, 7]], [[1, 2]], [[3, 4]], [[5, 6]]])]
    ro = assemble([[5, 6], [9, 9, 9]], 1, [[1, 2], [3]], [[0.0, 0.0], [0.0]], [False, False], 0, routes)
    assert ro.routes.shape == (2, 5, 1, 2)
    assert ro.routes[0, :, 0].tolist() == [[-1, -1], [0, 1], [2, 3], [4, 5], [-1, -1]]
    assert ro.routes[1, :, 0].tolist() == [[6, 7], [1, 2], [3, 4], [5, 6], [-1, -1]]


def test_vllm_routed_experts_conversion():
    # vLLM's CompletionOutput.routed_experts is [seq_len, layers, top_k] over prompt + completion, without the last
    # sampled token (never run); converted rows are aligned to input_ids with UNROUTED where the engine did not route
    import types

    import numpy as np

    from pgzoo.rollout.vllm_engine import routes_of

    prompt, comp = [5, 6, 7], [8, 9]
    routed = np.arange(4 * 2 * 2).reshape(4, 2, 2)  # 3 prompt + 1 completion position
    rows = routes_of(types.SimpleNamespace(routed_experts=routed), None, len(prompt) + len(comp))
    ro = assemble([prompt, [1]], 1, [comp, [4]], [[0.0, 0.0], [0.0]], [False, False], 0,
                  [rows, torch.zeros(1, 2, 2, dtype=torch.long)])
    assert ro.routes.shape == (2, 5, 2, 2)
    assert torch.equal(ro.routes[0, :4], torch.as_tensor(routed)) and (ro.routes[0, 4] == -1).all()
    assert (ro.routes[1, :2] == -1).all() and (ro.routes[1, 2] == 0).all() and (ro.routes[1, 3:] == -1).all()
    with pytest.raises(EngineError, match="routed_experts"):
        routes_of(types.SimpleNamespace(routed_experts=None), types.SimpleNamespace(), 3)


def test_rollouts_rejects_inconsistent_shapes():
    z = torch.zeros
    with pytest.raises(EngineError, match="logprobs"):
        Rollouts(z(2, 3, dtype=torch.long), z(2, 3, dtype=torch.bool), z(2, 4, dtype=torch.long),
                 z(2, 4, dtype=torch.bool), z(2, 5), z(2, dtype=torch.bool), z(2, dtype=torch.long))


# -- FP8 ----------------------------------------------------------------------------------------------------------
def test_fp8_matches_naive_per_channel_reference():
    torch.manual_seed(0)
    w = torch.randn(6, 16) * torch.logspace(-3, 1, 6)[:, None]
    q = quantize_fp8_tensor(w, "per-channel")
    for i in range(6):  # naive: one scale per row
        scale = w[i].abs().max() / 448.0
        ref = (w[i] / scale).to(torch.float8_e4m3fn).float() * scale
        assert torch.allclose(q[i], ref, rtol=0, atol=0)
    assert (q - w).abs().max() > 0  # it really rounds
    rel = ((q - w).abs() / w.abs().amax(1, keepdim=True)).max()
    assert rel <= 2.0**-4  # 3 mantissa bits: relative error below 1/16 of the row's max
    assert torch.equal(quantize_fp8_tensor(q, "per-channel"), q)  # idempotent: already on the FP8 grid


def test_fp8_per_tensor_and_3d_experts():
    torch.manual_seed(1)
    w = torch.randn(4, 8, 16)
    q = quantize_fp8_tensor(w, "per-tensor")
    scale = w.abs().max() / 448.0
    assert torch.equal(q, (w / scale).to(torch.float8_e4m3fn).float() * scale)
    qc = quantize_fp8_tensor(w, "per-channel")  # one scale per expert and output row
    scale_c = w.abs().amax(-1, keepdim=True) / 448.0
    assert torch.equal(qc, (w / scale_c).to(torch.float8_e4m3fn).float() * scale_c)
    with pytest.raises(ConfigError, match="granularity"):
        quantize_fp8_tensor(w, "per-block")


def test_fake_quantize_skips_embeddings_norms_router(vocab):
    model = build_tiny_moe(vocab, seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = fake_quantize_fp8(model)
    after = model.state_dict()
    assert any("experts.gate_up_proj" in n for n in names) and any("q_proj" in n for n in names)
    for key in before:
        changed = not torch.equal(before[key], after[key])
        skip = any(s in key for s in ("embed", "lm_head", "norm", "mlp.gate.weight"))
        assert changed == (not skip), key


# -- sampling helpers ---------------------------------------------------------------------------------------------
def test_top_p_mask_matches_naive():
    torch.manual_seed(3)
    logits = torch.randn(5, 30) * 2
    for p in (0.3, 0.75, 0.95):
        got = top_p_mask(logits, p)
        assert torch.equal(torch.isinf(got), torch.isinf(naive_nucleus(logits, p))), p
    assert torch.equal(top_p_mask(logits, 1.0), logits)


@pytest.mark.parametrize("vocab_size", [7, 40, 1000])
def test_multinomial_per_row_is_torch_multinomial_row_by_row(vocab_size):
    """Same tokens as one torch.multinomial call per row with the row's generator, and each generator left in the
    same state (the next draws agree too); rows with zero probabilities (a nucleus) and a one-hot row included."""
    torch.manual_seed(vocab_size)
    probs = torch.softmax(top_p_mask(torch.randn(64, vocab_size) * 3, 0.8), -1)
    probs[0] = torch.nn.functional.one_hot(torch.tensor(vocab_size - 1), vocab_size).float()
    mine = [torch.Generator().manual_seed(100 + b) for b in range(64)]
    ref = [torch.Generator().manual_seed(100 + b) for b in range(64)]
    for _ in range(3):
        got = multinomial_per_row(probs, mine)
        want = torch.cat([torch.multinomial(probs[b], 1, generator=g) for b, g in enumerate(ref)])
        assert torch.equal(got, want)
    assert got[0] == vocab_size - 1 and bool((probs.gather(-1, got[:, None]) > 0).all())
    with pytest.raises(ValueError):
        multinomial_per_row(probs, mine[:3])  # one generator per row


def test_non_finite_logits_are_an_engine_error(moe):
    broken = TransformersEngine(moe)
    with torch.no_grad():
        broken.model.lm_head.weight.fill_(float("nan"))
    with pytest.raises(EngineError, match="non-finite logits"):
        broken.generate(PROMPTS, n=2, max_new_tokens=4, seed=0)


# -- TransformersEngine -------------------------------------------------------------------------------------------
def test_protocol(engine):
    assert isinstance(engine, RolloutEngine) and engine.supports_routes


def test_float32_parity_and_temperature(engine, moe):
    for temperature in (1.0, 0.6):
        ro = engine.generate(PROMPTS, n=3, max_new_tokens=12, temperature=temperature, seed=0)
        ref = reference_logprobs(moe, ro, temperature)
        diff = (ro.logprobs - ref).abs()[ro.completion_mask]
        assert diff.mean() < 1e-4 and diff.max() < 1e-3, (temperature, diff.mean(), diff.max())
    # μ is the tempered distribution: against T = 1 logprobs of the same tokens it is clearly off
    untempered = reference_logprobs(moe, ro, 1.0)
    assert (ro.logprobs - untempered).abs()[ro.completion_mask].mean() > 1e-2


def test_top_p_logprobs_are_renormalised(engine, moe):
    ro = engine.generate(PROMPTS, n=2, max_new_tokens=8, temperature=0.8, top_p=0.7, seed=1)
    ref = reference_logprobs(moe, ro, 0.8, top_p=0.7)
    assert torch.isfinite(ref[ro.completion_mask]).all()  # every sampled token lies in the nucleus
    assert (ro.logprobs - ref).abs()[ro.completion_mask].max() < 1e-3


def test_greedy_is_argmax(engine, moe):
    ro = engine.generate(PROMPTS[:2], n=2, max_new_tokens=6, temperature=0.0)
    assert torch.equal(ro.completion_ids[0], ro.completion_ids[1])  # greedy: identical samples
    am = ro.attention_mask
    with torch.no_grad():
        logits = moe(ro.input_ids, attention_mask=am, position_ids=(am.cumsum(-1) - 1).clamp(min=0)).logits
    p = ro.prompt_ids.shape[1]
    pred = logits[:, p - 1: -1].argmax(-1)
    assert torch.equal(pred[ro.completion_mask], ro.completion_ids[ro.completion_mask])


def test_n_group_seed_and_truncation(engine):
    a = engine.generate(PROMPTS, n=4, max_new_tokens=10, seed=7)
    b = engine.generate(PROMPTS, n=4, max_new_tokens=10, seed=7)
    c = engine.generate(PROMPTS, n=4, max_new_tokens=10, seed=8)
    assert len(a) == 12 and a.group.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.completion_ids, c.completion_ids)
    for row in range(12):  # prompt rows of one group are that prompt, left-padded
        prompt = PROMPTS[row // 4]
        assert a.prompt_ids[row][a.prompt_mask[row]].tolist() == prompt
    lengths = a.completion_mask.sum(1)
    has_eos = [EOS in ids for ids in a.completions()]
    assert a.truncated.tolist() == [(not e) and int(n) == 10 for e, n in zip(has_eos, lengths)]
    assert (a.logprobs[~a.completion_mask] == 0).all() and (a.logprobs[a.completion_mask] < 0).all()


def test_per_prompt_seeds_make_rows_independent_of_the_batch(moe):
    """A prompt's completions depend on its seed only: not on the other prompts, their order or the batching — what
    lets ranks that each sample a share of a step's prompts draw what one process would."""
    seeds = [11, 5, 907]
    whole = TransformersEngine(moe).generate(PROMPTS, n=4, max_new_tokens=12, seed=seeds)
    small = TransformersEngine(moe, max_batch_size=3)  # chunks cut through groups
    for i in range(3):
        alone = small.generate([PROMPTS[i]], n=4, max_new_tokens=12, seed=[seeds[i]])
        assert alone.completions() == whole.completions()[4 * i: 4 * i + 4]
        rows = whole.select(slice(4 * i, 4 * i + 4))
        assert torch.allclose(alone.logprobs[:, :rows.logprobs.shape[1]], rows.logprobs[:, :alone.logprobs.shape[1]],
                              atol=1e-5)
    rev = TransformersEngine(moe).generate(PROMPTS[::-1], n=4, max_new_tokens=12, seed=seeds[::-1])
    assert rev.completions() == sum([whole.completions()[4 * i: 4 * i + 4] for i in (2, 1, 0)], [])
    # seed=s means [s, s + 1, ...]; completion j of a prompt draws with its seed + j (vLLM's rule for n > 1)
    assert TransformersEngine(moe).generate(PROMPTS, n=4, max_new_tokens=12, seed=11).completions()[:4] == \
        whole.completions()[:4]
    one = TransformersEngine(moe).generate([PROMPTS[0]], n=1, max_new_tokens=12, seed=[12])
    assert one.completions()[0] == whole.completions()[1]
    # the four completions of a prompt differ (each its own stream)
    assert len({tuple(c) for c in whole.completions()[:4]}) > 1


@pytest.mark.parametrize("seed, match", [([1, 2], "2 seeds for 3 prompts"), ([1, 2, -3], "-3 is not a non-negative"),
                                         ([1, 2, 3.0], "3.0 is not"), (True, "a seed is an integer"),
                                         ("7", "a seed is an integer")])
def test_bad_seeds_are_named(engine, seed, match):
    with pytest.raises(EngineError, match=match):
        engine.generate(PROMPTS, n=2, max_new_tokens=2, seed=seed)


def test_eos_stops_and_is_counted(vocab):
    model = build_tiny_moe(vocab, seed=0)
    eng = TransformersEngine(model)
    step = {"n": 0}

    def boost_eos(module, args, output):  # from the third generated token on, EOS dominates
        step["n"] += 1
        if step["n"] >= 3:
            output[..., EOS] += 40.0
        return output

    handle = eng.model.lm_head.register_forward_hook(boost_eos)
    try:
        ro = eng.generate(PROMPTS, n=2, max_new_tokens=20, seed=0)
    finally:
        handle.remove()
    assert ro.completion_mask.sum(1).tolist() == [3] * 6
    assert (ro.completion_ids[:, 2] == EOS).all() and not ro.truncated.any()
    assert ro.completion_ids.shape[1] == 3  # generation stopped once every row had finished
    assert (ro.logprobs[:, 2] > -1e-3).all()  # EOS had probability ~1 and its μ is counted


def test_routes_equal_full_forward(engine, moe):
    ro = engine.generate(PROMPTS, n=2, max_new_tokens=8, seed=4, return_routes=True)
    from pgzoo.routing import UNROUTED, record

    am = ro.attention_mask
    with record(moe) as rec:
        moe(ro.input_ids, attention_mask=am, position_ids=(am.cumsum(-1) - 1).clamp(min=0))
    full = rec.routes
    assert ro.routes.shape == full.shape == (6, ro.input_ids.shape[1], 4, 2)
    known = ro.routes[..., 0, 0] != UNROUTED
    real = am.bool()
    assert not (known & ~real).any()  # padding is UNROUTED
    assert torch.equal(ro.routes[known], full[known])
    # every real position is known except the last sampled token of rows that ran to the end of generation
    missing = real & ~known
    last = real.long().cumsum(1).argmax(1)
    assert missing.sum(1).le(1).all() and all(missing[i, last[i]] or not missing[i].any() for i in range(6))
    assert (ro.routes[known] >= 0).all() and (ro.routes[known] < 8).all()


@pytest.mark.parametrize("dtype,fp8", [("bfloat16", False), ("float16", False), ("float32", True)])
def test_reduced_precision_gives_controlled_discrepancy(moe, dtype, fp8):
    eng = TransformersEngine(moe, dtype=dtype, fp8=fp8)
    assert next(eng.model.parameters()).dtype == getattr(torch, dtype)
    assert next(moe.parameters()).dtype == torch.float32  # the policy itself is untouched
    ro = eng.generate(PROMPTS, n=4, max_new_tokens=12, seed=0)
    diff = (ro.logprobs - reference_logprobs(moe, ro))[ro.completion_mask]
    # a real mismatch (well above fp32 noise) that stays small: what correction terms are for
    assert 1e-4 < diff.abs().mean() < 0.2, diff.abs().mean()
    assert torch.isfinite(ro.logprobs).all()


def test_fp8_rollout_weights_lie_on_fp8_grid(moe):
    eng = TransformersEngine(moe, dtype="bfloat16", fp8=True, fp8_granularity="per-tensor")
    w = eng.model.model.layers[0].self_attn.q_proj.weight.float()
    src = moe.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(w, quantize_fp8_tensor(src, "per-tensor").to(torch.bfloat16).float())
    embed = eng.model.model.embed_tokens.weight.float()
    assert torch.equal(embed, moe.model.embed_tokens.weight.to(torch.bfloat16).float())  # not quantised


def test_load_weights_copies_on_sync_only(vocab):
    policy = build_tiny_moe(vocab, seed=5)
    eng = TransformersEngine(policy, fp8=True)
    before = eng.generate(PROMPTS, n=2, max_new_tokens=6, seed=0)
    with torch.no_grad():
        for p in policy.parameters():
            p.mul_(1.5)
    again = eng.generate(PROMPTS, n=2, max_new_tokens=6, seed=0)
    assert torch.equal(before.logprobs, again.logprobs)  # engine keeps θ_old until load_weights
    eng.load_weights(policy)
    after = eng.generate(PROMPTS, n=2, max_new_tokens=6, seed=0)
    assert not torch.equal(before.logprobs, after.logprobs)
    w = eng.model.model.layers[1].mlp.experts.down_proj
    assert torch.equal(w, quantize_fp8_tensor(policy.model.layers[1].mlp.experts.down_proj))  # re-quantised
    assert eng.last_sync_seconds is not None and eng.last_sync_seconds >= 0


def test_load_weights_unwraps_compiled_module(vocab):
    policy = build_tiny_moe(vocab, seed=8)
    eng = TransformersEngine(build_tiny_moe(vocab, seed=9))
    eng.load_weights(torch.compile(policy))  # state_dict keys carry `_orig_mod.`; the engine syncs the inner model
    experts = eng.model.model.layers[0].mlp.experts.gate_up_proj
    assert torch.equal(experts, policy.model.layers[0].mlp.experts.gate_up_proj)


def test_shared_module_engine(vocab):
    policy = build_tiny_moe(vocab, seed=6).train()
    eng = TransformersEngine(policy, copy=False)
    assert eng.model is policy
    # The caller's module (often the policy being trained) is neither frozen nor switched to eval mode.
    assert policy.training and all(p.requires_grad for p in policy.parameters())
    eng.load_weights(policy)  # no-op
    ro = eng.generate(PROMPTS[:1], n=2, max_new_tokens=4, seed=0)
    assert (ro.logprobs - reference_logprobs(policy, ro)).abs()[ro.completion_mask].max() < 1e-3


def test_dense_model_has_no_routes(vocab):
    eng = TransformersEngine(build_tiny_dense(vocab, seed=0))
    assert not eng.supports_routes
    ro = eng.generate(PROMPTS, n=1, max_new_tokens=4, seed=0)
    assert ro.routes is None and ro.completion_ids.shape[0] == 3
    with pytest.raises(EngineError, match="MoE"):
        eng.generate(PROMPTS, n=1, max_new_tokens=4, return_routes=True)


# -- errors -------------------------------------------------------------------------------------------------------
def test_bad_generate_arguments(engine):
    with pytest.raises(EngineError, match="empty prompt list"):
        engine.generate([], n=2)
    with pytest.raises(EngineError, match="n=0"):
        engine.generate(PROMPTS, n=0)
    with pytest.raises(EngineError, match="context is 256"):
        engine.generate([[1] * 250], n=1, max_new_tokens=10)
    with pytest.raises(EngineError, match="prompt 1 is empty"):
        engine.generate([[1, 2], []])
    with pytest.raises(EngineError, match="token ids, not strings"):
        engine.generate(["hello"])
    with pytest.raises(EngineError, match="outside the vocabulary"):
        engine.generate([[1, 10_000]])
    with pytest.raises(EngineError, match="temperature"):
        engine.generate(PROMPTS, temperature=-1.0)
    with pytest.raises(EngineError, match="top_p"):
        engine.generate(PROMPTS, top_p=0.0)


def test_bad_engine_settings(moe):
    with pytest.raises(ConfigError, match="dtype"):
        TransformersEngine(moe, dtype="float8")
    with pytest.raises(ConfigError, match="fp8_granularity"):
        TransformersEngine(moe, fp8=True, fp8_granularity="block")


def test_nan_weights_rejected_and_engine_unchanged(vocab):
    policy = build_tiny_moe(vocab, seed=7)
    eng = TransformersEngine(policy)
    before = eng.generate(PROMPTS, n=1, max_new_tokens=5, seed=0)
    with torch.no_grad():
        policy.model.layers[2].mlp.experts.gate_up_proj[3, 0, 0] = float("nan")
        policy.lm_head.weight[0, 0] = float("inf")  # tied to the embedding
    with pytest.raises(EngineError, match=r"NaN/Inf in .*layers\.2\.mlp\.experts\.gate_up_proj"):
        eng.load_weights(policy)
    after = eng.generate(PROMPTS, n=1, max_new_tokens=5, seed=0)
    assert torch.equal(before.logprobs, after.logprobs)


def test_load_weights_architecture_mismatch(engine, vocab):
    with pytest.raises(EngineError, match="same architecture"):
        engine.load_weights(build_tiny_dense(vocab, seed=0))
    with pytest.raises(EngineError, match="torch.nn.Module"):
        engine.load_weights({"weight": torch.zeros(1)})


def test_vllm_missing_names_the_extra(monkeypatch, tmp_path):
    from pgzoo.rollout import VLLMEngine

    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError, as when it is not installed
    with pytest.raises(DependencyError, match=r"pgzoo\[cpu\]"):
        VLLMEngine(tmp_path)


def test_vllm_engine_settings_checked_before_start(tmp_path):
    from pgzoo.rollout import VLLMEngine

    with pytest.raises(ConfigError, match="config.json"):
        VLLMEngine(tmp_path)
    with pytest.raises(ConfigError, match="dtype"):
        VLLMEngine(tmp_path, dtype="fp8")


def test_check_sync_measures_engine_policy_parity(moe, engine, vocab):
    from pgzoo.rollout import check_sync

    fp32 = check_sync(engine, moe, PROMPTS, tolerance=1e-4)
    assert fp32.num_tokens > 0 and fp32.mean_abs_diff < 1e-5
    bf16 = check_sync(TransformersEngine(moe, dtype="bfloat16"), moe, PROMPTS)
    assert bf16.mean_abs_diff > 100 * fp32.mean_abs_diff  # the engine's precision is the gap: set tolerance above it
    other = build_tiny_moe(vocab, seed=5)  # an engine holding other weights than the policy
    with pytest.raises(EngineError, match=r"weight sync check failed.*TransformersEngine.*> tolerance 0.0001"):
        check_sync(engine, other, PROMPTS, tolerance=1e-4)
    with pytest.raises(EngineError, match="at least one probe prompt"):
        check_sync(engine, moe, [])
    was_training = moe.training
    try:
        for mode in (True, False):  # the probe's forward runs in eval mode and restores the caller's mode
            moe.train(mode)
            check_sync(engine, moe, PROMPTS)
            assert moe.training is mode
    finally:
        moe.train(was_training)
