"""Off-policy objectives and rollout corrections from AReaL, OpenRLHF, slime and verl, against naive float64
token-by-token loops written from the formulas in their module docstrings (pgzoo/objectives/decoupled.py,
corrected.py, correction.py), and — where the origin's code is installed (verl) — against its own functions.

AReaL and OpenRLHF are not importable here (their packages pull in deepspeed, flash-attn, colorlog, ...), so
decoupled-ppo, m2po, icepop and seq-mask-tis are checked against the formulas; verl 0.9.1's
``rollout_corr_helper`` is called on the same tensors for IcePop weights, batch normalisation, the effective sample
size and the χ² metrics. The properties every objective owes are in tests/test_objective_properties.py.
"""

from __future__ import annotations

import math

import pytest
import test_objectives as generic
import torch
from _objective_checks import (
    assert_matches_reference,
    documented_metric_names,
    naive_gradient,
    variant_id,
)

import pgzoo
from pgzoo.objectives.correction import PRESETS, Correction
from pgzoo.testing import assert_same_gradient, random_batch

SCENARIOS = {
    "off-policy": dict(scale=0.3),
    "far": dict(scale=1.5),
    "nan-padding-per-token-adv": dict(pad_value=float("nan"), scale=0.5, per_token_advantages=True),
    "fully-masked-row": dict(fully_masked_row=True, scale=0.5, pad_value=float("nan")),
    "global-normalisers": dict(scale=0.5, num_sequences=11, num_tokens=37),
}


# ---------------------------------------------------------------------------------------------- naive references
def _tokens(batch, i):
    return [t for t in range(batch.seq_len) if batch.mask[i, t]]


def _adv(batch, i, t):
    a = batch.advantages
    return a[i, t] if a.dim() == 2 else a[i]


def naive_correction(c: Correction | None, batch, i, t, rho):
    """The correction weight of token (i, t) from the per-token log-ratios ``rho[i][t]`` (floats), or None."""
    toks = _tokens(batch, i)
    tok = math.exp(rho[i][t])
    seq = math.exp(sum(rho[i][s] for s in toks))
    geo = math.exp(sum(rho[i][s] for s in toks) / len(toks))
    w = {"token": tok, "sequence": seq, "geometric": geo}[c.level]
    if c.mode == "truncate":
        w = min(w, c.cap)
    else:
        gate = {"token": tok, "sequence": seq, "geometric": geo}[c.mask_level or c.level]
        if not (c.low <= gate <= c.high):
            w = 0.0
    if c.veto is not None and any(math.exp(rho[i][s]) < c.veto for s in toks):
        w = 0.0
    return w


def naive_m2_kept(batch, m2, threshold):
    """AReaL's rule: sort the unmasked tokens by m2 descending (the later token first among equals), mask the first
    k where k is the first index whose suffix mean is below the threshold; all but one if none is."""
    items = sorted(((m2[i][t], i * batch.seq_len + t) for i in range(batch.batch_size) for t in _tokens(batch, i)),
                   key=lambda x: (-x[0], -x[1]))
    n = len(items)
    k = n - 1
    for j in range(n):
        rest = [v for v, _ in items[j:]]
        if sum(rest) / len(rest) < threshold:
            k = j
            break
    return {idx for _, idx in items[k:]}


def naive_loss(name, cfg, batch, lp):
    """−Σ m·term / N_tok (token-mean: every objective here) from the formulas, one token at a time."""
    B, T = batch.mask.shape
    old = batch.old_logprobs if batch.old_logprobs is not None else batch.logprobs.detach()
    mu = batch.rollout_logprobs
    prox = [[0.0] * T for _ in range(B)]
    for i in range(B):
        for t in _tokens(batch, i):
            if name in ("decoupled-ppo", "m2po") and cfg.prox_alpha is not None:
                prox[i][t] = float(mu[i, t]) + cfg.prox_alpha * (float(lp[i, t].detach()) - float(mu[i, t]))
            else:
                prox[i][t] = float(old[i, t])
    rho = [[prox[i][t] - float(mu[i, t]) if batch.mask[i, t] else 0.0 for t in range(T)] for i in range(B)]
    kept = None
    if name == "m2po":
        kept = naive_m2_kept(batch, [[r * r for r in row] for row in rho], cfg.m2_threshold)
    total = lp.new_zeros(())
    for i in range(B):
        for t in _tokens(batch, i):
            a = float(_adv(batch, i, t))
            u = torch.exp(lp[i, t] - prox[i][t])
            lo = -math.inf if cfg.eps_low is None else 1 - cfg.eps_low
            hi = math.inf if cfg.eps_high is None else 1 + cfg.eps_high
            term = torch.minimum(u * a, torch.clamp(u, lo, hi) * a) if (lo, hi) != (-math.inf, math.inf) else u * a
            if cfg.clip_c is not None and a < 0:
                term = torch.maximum(term, torch.tensor(cfg.clip_c * a, dtype=lp.dtype))
            if name in ("decoupled-ppo", "m2po"):
                w = math.exp(rho[i][t]) if cfg.correction is None else naive_correction(cfg.correction, batch, i, t, rho)
            else:  # icepop, seq-mask-tis: GRPO with the correction
                w = naive_correction(cfg.correction, batch, i, t, rho)
            if kept is not None and i * T + t not in kept:
                w = 0.0
            total = total + w * term
    n_tok = batch.num_tokens if batch.num_tokens is not None else int(batch.mask.sum())
    return -total / n_tok


def naive_grad(name, obj, batch):
    return naive_gradient(lambda cfg, b, lp: naive_loss(name, cfg, b, lp), obj, batch)


VARIANTS = [
    ("decoupled-ppo", {}),
    ("decoupled-ppo", dict(correction=None)),
    ("decoupled-ppo", dict(prox_alpha=0.5)),
    ("decoupled-ppo", dict(prox_alpha=0.0, clip_c=2.0, eps_high=0.28)),
    ("decoupled-ppo", dict(correction={"level": "geometric", "mode": "truncate", "cap": 1.5}, eps_low=None)),
    ("decoupled-ppo", dict(correction={"level": "token", "mode": "mask", "low": 0.7, "high": 1.4, "veto": 0.5})),
    ("m2po", {}),
    ("m2po", dict(m2_threshold=0.02)),
    ("m2po", dict(prox_alpha=0.5, m2_threshold=0.01)),
    ("m2po", dict(eps_low=0.0, eps_high=0.0, correction={"mode": "mask", "low": 0.0, "high": 5.0})),  # AReaL's yaml
    ("icepop", {}),
    ("icepop", dict(correction={"level": "token", "mode": "mask", "low": 0.8, "high": 1.25})),
    ("seq-mask-tis", {}),
    ("seq-mask-tis", dict(correction={"level": "token", "mode": "mask", "mask_level": "geometric", "low": 0.8,
                                      "high": 1.25})),
    ("seq-mask-tis", dict(correction={"level": "token", "mode": "mask", "mask_level": "sequence", "low": 0.5,
                                      "high": 2.0, "veto": 0.3})),
]


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_gradient_matches_naive_reference(variant, scenario):
    name, options = variant
    assert_matches_reference(pgzoo.get(name, **options), lambda obj, batch: naive_grad(name, obj, batch),
                             SCENARIOS[scenario], moves=False)


def test_references_exercise_the_masks():
    """The scenarios above actually mask: M2PO drops tokens, the behaviour cap, IcePop's band and seq-mask-tis's
    sequence gate all fire on some seeds (a reference that never masks could not tell the formulas apart)."""
    fired = {k: 0.0 for k in ("m2po", "decoupled", "icepop", "seq")}
    for seed in range(3):
        batch = random_batch(5, 7, seed=seed, scale=1.5)
        fired["m2po"] += float(pgzoo.get("m2po")(batch).metrics["decoupled/m2_masked_fraction"])
        fired["decoupled"] += float(pgzoo.get("decoupled-ppo")(batch).metrics["correction/masked_fraction"])
        fired["icepop"] += float(pgzoo.get("icepop")(batch).metrics["correction/masked_fraction"])
        fired["seq"] += float(pgzoo.get("seq-mask-tis")(batch).metrics["correction/masked_fraction"])
    assert all(v > 0 for v in fired.values()), fired
    batch = random_batch(5, 7, seed=0, scale=0.15)
    # on a batch of small log-ratios (mean m2 near the threshold) m2po drops a few tokens, not most
    frac = float(pgzoo.get("m2po", m2_threshold=0.02)(batch).metrics["decoupled/m2_masked_fraction"])
    assert 0 < frac < 0.5


# ---------------------------------------------------------------------------------------------- equalities
def test_decoupled_ppo_recomputed_is_grpo_token_mean_with_the_behaviour_correction():
    """With π_prox = old_logprobs, decoupled PPO is the PPO-clip term times the correction of old − mu: `grpo` at
    token-mean with the same correction, gradient for gradient (dual clip included)."""
    for opts in ({}, dict(clip_c=3.0), dict(correction={"level": "geometric", "mode": "truncate", "cap": 1.5})):
        for seed in range(3):
            batch = random_batch(6, 8, seed=seed, scale=0.8, pad_value=float("nan"), per_token_advantages=seed == 1)
            dec = pgzoo.get("decoupled-ppo", **opts)
            grpo = pgzoo.get("grpo", aggregation="token-mean", clip_c=opts.get("clip_c"),
                             correction=dec.config.correction)
            assert_same_gradient(dec, grpo, batch)


def test_m2po_without_clip_or_cap_is_the_papers_masked_importance_weight():
    """m2po's default term is M·exp(lp − mu)·A (the paper), whatever old_logprobs hold: u·w = exp(lp − mu)."""
    batch = random_batch(6, 8, seed=4, scale=0.4, pad_value=float("nan"))
    obj = pgzoo.get("m2po")
    keep = obj.token_mask(batch, batch.clean("old_logprobs"))

    def paper(b):
        lp = b.masked(b.logprobs)
        w = torch.exp(lp - b.clean("rollout_logprobs"))
        return -(torch.where(keep, w * b.token_advantages(), 0.0)).sum() / b.token_count()

    assert_same_gradient(obj, paper, batch)


def test_m2po_masks_nothing_when_the_second_moment_is_already_small():
    batch = random_batch(6, 8, seed=2, scale=0.01)
    out = pgzoo.get("m2po")(batch)
    assert float(out.metrics["decoupled/m2_masked_fraction"]) == 0.0
    assert_same_gradient(pgzoo.get("m2po"), pgzoo.get("decoupled-ppo", eps_low=None, eps_high=None,
                                                      correction=None), batch)


def test_m2po_mask_is_batch_level_and_keeps_one_token_at_least():
    """The mask of a half batch differs from the whole batch's (why shard_additive is False), and a batch whose
    every token is far off keeps exactly one token, as AReaL does."""
    assert type(pgzoo.get("m2po")).shard_additive is False
    batch = random_batch(8, 6, seed=5, scale=0.3, padding=False)
    # rows 0–3 nearly on policy, rows 4–7 stale: alone, the stale half must drop more of its tokens to get its
    # own mean m2 under τ than it does inside the whole batch, whose fresh half lowers the mean
    spread = torch.tensor([0.05] * 4 + [1.0] * 4, dtype=torch.float64)[:, None]
    batch = batch.replace(rollout_logprobs=batch.old_logprobs + spread * (batch.rollout_logprobs - batch.old_logprobs))
    obj = pgzoo.get("m2po")
    full = obj.token_mask(batch, batch.clean("old_logprobs"))
    half = batch.replace(**{k: getattr(batch, k)[4:] for k in ("logprobs", "mask", "advantages", "old_logprobs",
                                                                "rollout_logprobs", "ref_logprobs")})
    alone = obj.token_mask(half, half.clean("old_logprobs"))
    assert int(alone.sum()) < int(full[4:].sum())
    far = random_batch(3, 4, seed=1, scale=20.0, padding=False)
    kept = obj.token_mask(far, far.clean("old_logprobs"))
    assert int(kept.sum()) == 1


def test_loglinear_proximal_is_areals_interpolation():
    """prox_alpha = α: log π_prox = mu + α(sg(lp) − mu); α = 0 puts π_prox at the behaviour policy (weight 1,
    clip against μ); α = 1 at the current policy (u = 1: the plain weighted REINFORCE gradient w·A)."""
    batch = random_batch(5, 6, seed=3, scale=0.5, pad_value=float("nan"))
    at_mu = pgzoo.get("decoupled-ppo", prox_alpha=0.0, correction=None)
    ppo_vs_mu = pgzoo.get("dapo", eps_high=0.2)
    assert_same_gradient(at_mu, ppo_vs_mu, batch.replace(old_logprobs=batch.rollout_logprobs))
    at_theta = pgzoo.get("decoupled-ppo", prox_alpha=1.0, correction=None)

    def weighted_reinforce(b):
        lp = b.masked(b.logprobs)
        w = torch.exp(lp.detach() - b.clean("rollout_logprobs"))
        return -(w * b.token_advantages() * torch.exp(lp - lp.detach())).sum() / b.token_count()

    assert_same_gradient(at_theta, weighted_reinforce, batch)


def test_icepop_and_seq_mask_tis_are_grpo_with_the_presets():
    batch = random_batch(6, 8, seed=1, scale=1.0, pad_value=float("nan"))
    for name in ("icepop", "seq-mask-tis"):
        explicit = pgzoo.get("grpo", aggregation="token-mean", correction=Correction(**PRESETS[name]))
        assert_same_gradient(name, explicit, batch)
        assert pgzoo.get(name).config.correction == Correction(**PRESETS[name])
    assert PRESETS["icepop"] == dict(level="token", mode="mask", low=0.5, high=5.0)
    # seq-mask-tis keeps per-token weights (the geometric-level correction would put g_i on every token instead)
    seq_tis = pgzoo.get("seq-mask-tis")(batch)
    geo = pgzoo.get("grpo", aggregation="token-mean", correction=dict(level="geometric", mode="mask"))(batch)
    assert not torch.allclose(seq_tis.loss, geo.loss)


# ---------------------------------------------------------------------------------------------- the correction
def test_correction_weights_match_the_formula():
    for c in (Correction(level="token", mode="mask", mask_level="geometric", low=0.8, high=1.25),
              Correction(level="token", mode="mask", mask_level="sequence", low=0.5, high=2.0),
              Correction(level="token", mode="truncate", cap=1.5, veto=0.6),
              Correction(level="sequence", mode="mask", low=0.3, high=3.0, veto=0.5),
              Correction(level="geometric", mode="truncate", cap=1.2, veto=0.4)):
        for seed in range(3):
            batch = random_batch(6, 7, seed=seed, scale=0.7, pad_value=float("nan"), fully_masked_row=True)
            old, mu = batch.clean("old_logprobs"), batch.clean("rollout_logprobs")
            rho = (old - mu).tolist()
            w, _ = c.token_weights(batch)
            for i in range(batch.batch_size):
                for t in _tokens(batch, i):
                    assert math.isclose(float(w[i, t]), naive_correction(c, batch, i, t, rho), rel_tol=1e-12)


def _verl_helper():
    return pytest.importorskip("verl.trainer.ppo.rollout_corr_helper")


@pytest.mark.parametrize("level,threshold,preset", [
    ("token", "0.5_5.0", Correction(level="token", mode="mask", low=0.5, high=5.0)),     # verl's IcePop
    ("token", 2.0, Correction(level="token", mode="truncate", cap=2.0)),                # verl's token TIS
    ("sequence", 2.0, Correction(level="sequence", mode="truncate", cap=2.0)),          # verl's sequence TIS
])
@pytest.mark.parametrize("normalize", [False, True])
def test_weights_ess_and_batch_norm_match_verls_code(level, threshold, preset, normalize):
    """verl 0.9.1's compute_rollout_correction_weights on the same tensors: the weights (batch-normalised or not),
    its batch-norm factor, and at token level its effective sample size, 1/mean((w/mean w)²)."""
    helper = _verl_helper()
    corr = Correction(**{**preset.__dict__, "normalize": normalize})
    for seed in range(3):
        batch = random_batch(6, 9, seed=seed, scale=0.8)
        mask = batch.mask.to(torch.float64)
        log_ratio = batch.old_logprobs - batch.rollout_logprobs
        w_verl, m_verl = helper.compute_rollout_correction_weights(
            log_ratio, mask, rollout_is=level, rollout_is_threshold=threshold, rollout_is_batch_normalize=normalize)
        w, metrics = corr.token_weights(batch)
        # verl's masked_mean divides by (count + 1e-8): agreement to ~1e-9 relative, not to the last bit
        torch.testing.assert_close(torch.where(batch.mask, w, 0.0), w_verl.to(w.dtype) * mask, rtol=1e-8, atol=1e-12)
        if normalize:
            assert math.isclose(float(metrics["correction/batch_norm_factor"]), m_verl["rollout_is_batch_norm_factor"],
                                rel_tol=1e-8)
        if level == "token":  # verl's ESS is over tokens; pgzoo's is over the correction's units (here tokens)
            assert math.isclose(float(metrics["correction/ess"]), m_verl["rollout_is_eff_sample_size"], rel_tol=1e-6)


def test_chi2_metrics_match_verls_code():
    helper = _verl_helper()
    for seed in range(3):
        batch = random_batch(6, 9, seed=seed, scale=0.4)  # no fully masked row: verl averages χ²_seq over all rows
        _, metrics = Correction().weights(batch)
        ref = helper.compute_offpolicy_metrics(batch.old_logprobs, batch.rollout_logprobs, batch.mask.to(torch.float64))
        assert math.isclose(float(metrics["correction/chi2_token"]), ref["chi2_token"], rel_tol=1e-8, abs_tol=1e-12)
        assert math.isclose(float(metrics["correction/chi2_seq"]), ref["chi2_seq"], rel_tol=1e-8, abs_tol=1e-12)


def test_ess_and_chi2_formulas_at_sequence_level():
    batch = random_batch(7, 6, seed=8, scale=0.5, fully_masked_row=True, pad_value=float("nan"))
    c = Correction(level="geometric", mode="truncate", cap=1.3)
    w, metrics = c.weights(batch)
    rows = [i for i in range(batch.batch_size) if batch.mask[i].any()]
    ws = [float(w[i]) for i in rows]
    assert math.isclose(float(metrics["correction/ess"]), sum(ws) ** 2 / (len(ws) * sum(x * x for x in ws)),
                        rel_tol=1e-12)
    rho = (batch.clean("old_logprobs") - batch.clean("rollout_logprobs"))
    chi2_seq = sum(math.exp(2 * float(rho[i].sum())) for i in rows) / len(rows) - 1
    assert math.isclose(float(metrics["correction/chi2_seq"]), chi2_seq, rel_tol=1e-12)
    # equal weights: ESS 1; all weights zero: ESS 0 (not NaN)
    same = batch.replace(rollout_logprobs=batch.old_logprobs)
    assert float(Correction().weights(same)[1]["correction/ess"]) == pytest.approx(1.0)
    none = Correction(mode="mask", low=2.0, high=3.0).weights(same)[1]
    assert float(none["correction/ess"]) == 0.0


def test_normalize_is_per_batch_so_micro_batches_do_not_add_up():
    """normalize divides by the mean over the TokenBatch given: two halves, each with the global normalisers,
    no longer sum to the whole batch's gradient (verl normalises once over its whole batch)."""
    obj = pgzoo.get("grpo", aggregation="token-mean", correction=dict(mode="truncate", cap=3.0, normalize=True))
    batch = random_batch(8, 6, seed=2, scale=0.8, padding=False)
    n_seq, n_tok = 8, int(batch.mask.sum())
    _, g_full = generic.lib_grad(obj, batch)
    grads = []
    for rows in (slice(0, 4), slice(4, 8)):
        part = batch.replace(num_sequences=n_seq, num_tokens=n_tok, **{
            k: getattr(batch, k)[rows] for k in ("logprobs", "mask", "advantages", "old_logprobs",
                                                  "rollout_logprobs", "ref_logprobs")})
        grads.append(generic.lib_grad(obj, part)[1])
    assert not torch.allclose(torch.cat(grads), g_full)
    w, metrics = obj.config.correction.token_weights(batch)
    assert float(torch.where(batch.mask, w, 0.0).sum() / batch.mask.sum()) == pytest.approx(1.0)


def test_option_metrics_are_documented_and_finite():
    documented = documented_metric_names()
    batch = random_batch(5, 6, seed=0, scale=2.0, pad_value=float("nan"), fully_masked_row=True)
    for name, opts in [("grpo", dict(correction=dict(veto=0.5, normalize=True))),
                       ("cispo", dict(correction="seq-mask-tis")), ("m2po", {}), ("decoupled-ppo", dict(clip_c=2.0)),
                       ("m2po", dict(correction="icepop", prox_alpha=0.3))]:
        out = pgzoo.get(name, **opts)(batch)
        assert set(out.metrics) <= documented, set(out.metrics) - documented
        assert all(torch.isfinite(v) for v in out.metrics.values()), name
    out = pgzoo.get("grpo", correction=dict(veto=0.5, normalize=True))(batch)
    assert {"correction/veto_fraction", "correction/batch_norm_factor"} <= set(out.metrics)


@pytest.mark.parametrize("name,options,key", [
    ("grpo", dict(correction="tis-please"), "preset"),
    ("grpo", dict(correction=dict(mode="truncate", mask_level="geometric")), "correction.mask_level"),
    ("grpo", dict(correction=dict(level="geometric", mode="mask", mask_level="token")), "correction.mask_level"),
    ("grpo", dict(correction=dict(veto=1.5)), "correction.veto"),
    ("grpo", dict(correction=dict(veto=0.0)), "correction.veto"),
    ("grpo", dict(correction=dict(normalize="yes")), "correction.normalize"),
    ("m2po", dict(m2_threshold=0.0), "m2_threshold"),
    ("m2po", dict(m2_threshold=float("inf")), "m2_threshold"),
    ("decoupled-ppo", dict(prox_alpha=1.5), "prox_alpha"),
    ("decoupled-ppo", dict(eps_low=1.0), "eps_low"),
    ("decoupled-ppo", dict(clip_c=1.0), "clip_c"),
])
def test_config_errors_name_the_field(name, options, key):
    with pytest.raises(pgzoo.ConfigError, match=key):
        pgzoo.get(name, **options)


def test_defaults_are_the_origins():
    dec = pgzoo.get("decoupled-ppo").config
    assert (dec.eps_low, dec.eps_high, dec.clip_c, dec.prox_alpha, dec.aggregation) == (0.2, 0.2, None, None,
                                                                                      "token-mean")
    assert dec.correction == Correction(level="token", mode="mask", low=0.0, high=5.0)  # behav_imp_weight_cap=5
    m2 = pgzoo.get("m2po").config
    assert (m2.m2_threshold, m2.eps_low, m2.eps_high, m2.correction) == (0.04, None, None, None)
    assert pgzoo.get("m2po").requires == {"rollout_logprobs"}
    for name in ("icepop", "seq-mask-tis"):
        c = pgzoo.get(name).config
        assert (c.eps_low, c.eps_high, c.aggregation) == (0.2, 0.2, "token-mean")  # OpenRLHF's PolicyLoss
