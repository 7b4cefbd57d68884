"""bnpo, luspo, sapo, vespo and the loss-shaping options against a naive float64 loop written from their formulas
(docstrings of pgzoo.objectives.grpo / sapo / vespo / shaping), plus the equivalences users ask about.

metrics=False, compile, masking, row order and extreme ratios, with and without the shaping options, are checked
for every objective in tests/test_objective_properties.py."""

from __future__ import annotations

import math

import pytest
import torch

import pgzoo
from pgzoo.objectives.correction import Correction
from pgzoo.testing import assert_same_gradient, random_batch

NEW = ["bnpo", "luspo", "sapo", "vespo"]
SHAPED = ["grpo", "dr-grpo", "dapo", "bnpo", "luspo", "sapo", "cispo", "vespo"]


# ---------------------------------------------------------------------------------------------- naive reference
def _quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _kl(lp, ref, estimator, clamp):
    d = ref - lp
    if estimator == "k1":
        v = -d
    elif estimator == "k2":
        v = 0.5 * d * d
    else:
        v = torch.exp(d) - d - 1
        if estimator == "low-var-k3" and clamp is None:
            clamp = 10.0
    return v if clamp is None else torch.clamp(v, -clamp, clamp)


def naive_loss(obj, batch: pgzoo.TokenBatch, lp: torch.Tensor, ent: torch.Tensor) -> torch.Tensor:
    c, name = obj.config, type(obj).__name__
    B, T = lp.shape
    m, adv = batch.mask, batch.advantages
    old = batch.old_logprobs if batch.old_logprobs is not None else lp.detach()
    mu, ref = batch.rollout_logprobs, batch.ref_logprobs

    def A(i, t):
        return float(adv[i] if adv.dim() == 1 else adv[i, t])

    def toks(i):
        return [t for t in range(T) if m[i, t]]

    rows = [toks(i) for i in range(B)]
    n_seq = batch.num_sequences or sum(1 for r in rows if r)
    n_tok = batch.num_tokens or sum(len(r) for r in rows)
    L = batch.max_tokens or T
    kept = {(i, t) for i in range(B) for t in rows[i]}
    if c.top_entropy_quantile < 1:
        thr = _quantile([float(ent[i, t]) for (i, t) in kept], 1 - c.top_entropy_quantile)
        kept = {(i, t) for (i, t) in kept if float(ent[i, t]) >= thr}
    keep = set(kept)
    if c.off_policy_mask_threshold is not None:
        sampler = mu if mu is not None else old
        for i in range(B):
            if rows[i]:
                kl = sum(float(sampler[i, t] - lp[i, t]) for t in rows[i]) / len(rows[i])
                keep -= {(i, t) for t in rows[i] if A(i, t) < 0 and kl > c.off_policy_mask_threshold}

    def corr(i, t):
        cr = getattr(c, "correction", None)
        if cr is None:
            return 1.0
        log_w = float(old[i, t] - mu[i, t]) if cr.level == "token" else sum(float(old[i, s] - mu[i, s])
                                                                             for s in rows[i])
        if cr.level == "geometric":
            log_w /= len(rows[i])
        w = math.exp(log_w)
        return min(w, cr.cap) if cr.mode == "truncate" else (w if cr.low <= w <= cr.high else 0.0)

    level = getattr(c, "importance_sampling_level", "token")
    total = lp.new_zeros(())
    for i in range(B):
        if not rows[i]:
            continue
        seq_log_r = sum(lp[i, t] - old[i, t] for t in rows[i]) / len(rows[i])
        if name == "VESPO":
            log_w = sum(float(torch.clamp(lp[i, t] - old[i, t], -20, 20)) for t in rows[i])
            log_w = min(max(log_w, math.log(1e-8)), 20.0)
        row = lp.new_zeros(())
        for t in rows[i]:
            a = A(i, t)
            r = torch.exp(lp[i, t] - old[i, t]) if level == "token" else torch.exp(seq_log_r)
            if name == "GRPO":
                r1 = r if c.delta is None else torch.clamp(r, max=c.delta)
                p = torch.minimum(r1 * a, torch.clamp(r, 1 - c.eps_low, 1 + c.eps_high) * a)
            elif name == "SAPO":
                tau = c.temperature_pos if a > 0 else c.temperature_neg
                p = torch.sigmoid(tau * (r - 1)) * 4 / tau * a
            elif name == "CISPO":
                lo = 1 - c.eps_low if c.eps_low is not None else -math.inf
                p = min(max(float(r), lo), 1 + c.eps_high) * a * lp[i, t]
            else:  # VESPO
                k, lam = (c.k_pos, c.lambda_pos) if a >= 0 else (c.k_neg, c.lambda_neg)
                phi = math.exp(lam + k * log_w - lam * math.exp(log_w))
                p = phi * a * lp[i, t]
            p = p * ((i, t) in keep) * corr(i, t)
            if c.beta > 0:
                kl = _kl(lp[i, t], ref[i, t], c.kl, c.kl_clamp)
                if c.bias_correction_kl:
                    kl = kl * (torch.exp(lp[i, t] - old[i, t]) if name == "VESPO" else r)
                if c.correct_kl:
                    kl = kl * corr(i, t)
                p = p - c.beta * kl
            row = row + p
        agg = c.aggregation
        if agg == "seq-mean-token-mean":
            total = total + row / len(rows[i]) / n_seq
        elif agg == "seq-mean-token-sum":
            total = total + row / n_seq
        elif agg == "constant":
            total = total + row / (n_seq * L)
        else:
            total = total + row / n_tok
    loss = -total
    if c.entropy_coef != 0:
        n_kept = len(kept)
        count = n_tok * n_kept / sum(len(r) for r in rows)
        loss = loss - c.entropy_coef * sum(ent[i, t] for (i, t) in kept) / count
    return loss


def grads(fn, batch, ent0):
    lp = batch.logprobs.detach().clone().requires_grad_(True)
    ent = ent0.clone().requires_grad_(True)
    loss = fn(lp, ent)
    g_lp, g_ent = torch.autograd.grad(loss, (lp, ent), allow_unused=True)
    zero = torch.zeros_like(lp)
    g_lp = zero if g_lp is None else torch.where(batch.mask, g_lp, zero)
    g_ent = zero if g_ent is None else torch.where(batch.mask, g_ent, zero)
    return loss.detach(), g_lp, g_ent


def check(obj, batch, ent):
    def lib(lp, e):
        out = obj(batch.replace(logprobs=lp, entropies=e))
        for key, value in out.metrics.items():
            assert torch.isfinite(value).all() and not value.requires_grad, key
        return out.loss

    loss, g, ge = grads(lib, batch, ent)
    ref_loss, ref_g, ref_ge = grads(lambda lp, e: naive_loss(obj, batch, lp, e), batch, ent)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g, ref_g, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ge, ref_ge, rtol=1e-9, atol=1e-12)
    return g


SCENARIOS = {
    "on-policy": dict(off_policy=False),
    "off-policy": dict(scale=0.3),
    "far": dict(scale=1.5),  # ratios far outside every clip band and δ
    "per-token-adv": dict(per_token_advantages=True, scale=0.3),
    "nan-padding": dict(pad_value=float("nan"), scale=0.3, per_token_advantages=True),
    "garbage-padding": dict(pad_value=1e30, scale=0.3),
    "fully-masked-row": dict(fully_masked_row=True, scale=0.3, pad_value=float("nan")),
    "global-normalisers": dict(scale=0.3, num_sequences=11, num_tokens=37, max_tokens=20),
}


def entropies(batch, seed, pad_value=None):
    e = torch.rand(batch.logprobs.shape, generator=torch.Generator().manual_seed(100 + seed), dtype=torch.float64)
    return e if pad_value is None else torch.where(batch.mask, e, torch.full_like(e, pad_value))


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("name", NEW)
def test_new_objectives_match_naive_reference(name, scenario):
    obj = pgzoo.get(name)
    nonzero = 0
    for seed in range(3):
        batch = random_batch(5, 7, seed=seed, **SCENARIOS[scenario])
        g = check(obj, batch, entropies(batch, seed, SCENARIOS[scenario].get("pad_value")))
        nonzero += int((g != 0).any())
    assert nonzero  # the comparison is not vacuous


OPTIONS = {
    "entropy-mask": dict(top_entropy_quantile=0.4),
    "off-policy-mask": dict(off_policy_mask_threshold=0.05),
    "beta-k1": dict(beta=0.1, kl="k1"),
    "beta-k2-bias-corrected": dict(beta=0.1, kl="k2", bias_correction_kl=True),
    "beta-low-var-k3": dict(beta=0.1, kl="low-var-k3"),
    "beta-k3-clamped": dict(beta=0.1, kl="k3", kl_clamp=0.05),
    "entropy-bonus": dict(entropy_coef=0.05),
    "all": dict(top_entropy_quantile=0.6, off_policy_mask_threshold=0.05, beta=0.05, entropy_coef=0.02,
                bias_correction_kl=True),
}


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("name", SHAPED)
def test_shaping_options_match_naive_reference(name, option):
    obj = pgzoo.get(name, **OPTIONS[option])
    for seed, scenario in enumerate(["off-policy", "nan-padding", "fully-masked-row", "far"]):
        kw = SCENARIOS[scenario]
        batch = random_batch(5, 7, seed=seed, **kw)
        check(obj, batch, entropies(batch, seed, kw.get("pad_value")))


@pytest.mark.parametrize("name", ["grpo", "dapo", "bnpo", "sapo", "cispo"])
def test_sequence_level_delta_and_correction_match_naive_reference(name):
    corr = Correction(level="token", mode="truncate", cap=1.3)
    variants = [dict(importance_sampling_level="sequence"), dict(correction=corr, beta=0.1),
                dict(correction=corr, beta=0.1, correct_kl=True)]
    if name in ("grpo", "dapo", "bnpo"):
        variants.append(dict(delta=1.5, importance_sampling_level="sequence"))
        variants.append(dict(delta=1.3))
    for options in variants:
        obj = pgzoo.get(name, **options)
        for seed, scenario in enumerate(["far", "per-token-adv", "fully-masked-row"]):
            batch = random_batch(5, 7, seed=seed, **SCENARIOS[scenario])
            check(obj, batch, entropies(batch, seed))


# ---------------------------------------------------------------------------------------------- conventions
def test_correction_weights_only_the_policy_term_by_default():
    """TRL and verl: w·surrogate + β·KL. correct_kl=True: w·(surrogate + β·KL), pgzoo's earlier convention."""
    batch = random_batch(6, 8, seed=3, scale=0.5)
    corr = {"level": "token", "mode": "truncate", "cap": 1.5}
    peer, weighted = pgzoo.get("grpo", beta=0.2, correction=corr), pgzoo.get("grpo", beta=0.2, correction=corr,
                                                                             correct_kl=True)
    assert peer.config.correct_kl is False
    g_peer = pgzoo.testing.grad_wrt_logprobs(peer, batch)
    g_policy = pgzoo.testing.grad_wrt_logprobs(pgzoo.get("grpo", correction=corr), batch)
    g_kl = pgzoo.testing.grad_wrt_logprobs(pgzoo.get("grpo", beta=0.2), batch) - pgzoo.testing.grad_wrt_logprobs(
        "grpo", batch)
    torch.testing.assert_close(g_peer, g_policy + g_kl)  # the KL gradient carries no correction weight
    assert not torch.allclose(pgzoo.testing.grad_wrt_logprobs(weighted, batch), g_peer)


def test_entropies_are_validated_and_required():
    batch = random_batch(3, 4, seed=0)
    with pytest.raises(pgzoo.BatchError, match="entropies"):
        pgzoo.get("grpo", top_entropy_quantile=0.2)(batch)
    with pytest.raises(pgzoo.BatchError, match="entropies"):
        batch.replace(entropies=torch.rand(3, 5, dtype=torch.float64))
    with pytest.raises(pgzoo.BatchError, match="entropies"):
        batch.replace(entropies=torch.full((3, 4), float("nan"), dtype=torch.float64))
    assert "entropies" in pgzoo.get("sapo", entropy_coef=0.01).requires
    with pytest.raises(pgzoo.BatchError, match="entropy_coef"):  # a bonus without gradient would be a no-op
        pgzoo.get("grpo", entropy_coef=0.01)(batch.replace(entropies=torch.rand(3, 4, dtype=torch.float64)))
    assert "entropies" not in pgzoo.get("sapo").requires


def test_option_validation_names_the_key():
    for name, kw, key in [("grpo", dict(kl="k4"), "kl="), ("bnpo", dict(top_entropy_quantile=1.5), "top_entropy"),
                          ("grpo", dict(delta=1.1), "delta"), ("dapo", dict(off_policy_mask_threshold=-1), "off_"),
                          ("sapo", dict(temperature_neg=0), "temperature_neg"), ("vespo", dict(k_pos=-1), "k_pos"),
                          ("cispo", dict(importance_sampling_level="seq"), "importance_sampling_level"),
                          ("luspo", dict(bias_correction_kl=1), "bias_correction_kl"),
                          ("grpo", dict(kl_clamp=0), "kl_clamp"), ("grpo", dict(entropy_coef="0.1"), "entropy_coef")]:
        with pytest.raises(pgzoo.ConfigError, match=key):
            pgzoo.get(name, **kw)


def test_defaults():
    assert pgzoo.get("bnpo").config.eps_high == pgzoo.get("bnpo").config.eps_low == 0.2
    s = pgzoo.get("sapo").config
    assert (s.temperature_pos, s.temperature_neg, s.aggregation) == (1.0, 1.05, "seq-mean-token-mean")
    v = pgzoo.get("vespo").config
    assert (v.k_pos, v.lambda_pos, v.k_neg, v.lambda_neg, v.aggregation) == (2.0, 3.0, 3.0, 2.0, "token-mean")
    lu = pgzoo.get("luspo").config
    assert (lu.importance_sampling_level, lu.aggregation) == ("sequence", "seq-mean-token-sum")
    for name in NEW:
        obj = pgzoo.get(name)
        assert "arXiv" in obj.paper and obj.default_advantage == "group-mean-std" and obj.config.beta == 0


# ---------------------------------------------------------------------------------------------- equivalences
def test_dapo_with_symmetric_clip_is_bnpo():
    for seed in range(3):
        batch = random_batch(6, 8, seed=seed, scale=0.5, per_token_advantages=bool(seed % 2))
        assert_same_gradient(pgzoo.get("dapo", eps_high=0.2), "bnpo", batch)


def test_gspo_equals_gspo_token_with_sequence_constant_advantages():
    batch = random_batch(6, 8, seed=4, scale=2e-4)  # [B] advantages, inside GSPO's narrow band and outside it
    assert_same_gradient("gspo", "gspo-token", batch)
    assert_same_gradient("gspo", "gspo-token", random_batch(6, 8, seed=5, scale=0.3))


def test_minirl_no_clip_on_policy_is_reinforce_with_group_mean_baseline():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    adv = pgzoo.advantages.compute("group-mean", rewards, group_size=4)
    base = random_batch(8, 6, seed=6, off_policy=False, rollout=False)
    batch = base.replace(advantages=adv, rollout_logprobs=base.logprobs.detach())  # sampler = policy: μ = π_θ

    def reinforce(b):
        means = rewards.view(2, 4).mean(1).repeat_interleave(4)
        lp = b.masked(b.logprobs)
        return pgzoo.ObjectiveOutput(-((rewards - means)[:, None] * lp).sum() / b.sequence_count(), {})

    assert_same_gradient("minirl-no-clip", reinforce, batch)


def test_on_policy_reductions_and_luspo_length_weighting():
    batch = random_batch(6, 8, seed=7, off_policy=False)
    assert_same_gradient("sapo", "grpo", batch)  # the gate's gradient factor is 1 at r = 1
    assert_same_gradient("vespo", "dapo", batch)  # φ(1) = 1: token-mean REINFORCE
    # luspo = Σ_i |y_i|·term_i / N_seq with grpo's sequence-level term_i: its gradient is |y_i| times grpo's
    off = random_batch(6, 8, seed=8, scale=0.1)
    luspo = pgzoo.testing.grad_wrt_logprobs("luspo", off)
    grpo_seq = pgzoo.testing.grad_wrt_logprobs(pgzoo.get("grpo", importance_sampling_level="sequence"), off)
    torch.testing.assert_close(luspo, grpo_seq * off.seq_lengths()[:, None])
