"""The objectives that come from verl (gpg, clip-cov, kl-cov, gmpo, dppo-tv, dppo-kl, dual clip, token-sum) against
naive float64 loops written from each module's docstring formula. The properties every objective owes (masking,
micro-batches, metrics=False, compile, extreme ratios, ...) are checked for all of them in
tests/test_objective_properties.py; here, those that need verl-specific options (active covariance selection, ...).

The references read only unmasked positions, one token at a time. verl's own code is the subject of
tests/test_verl_losses.py.
"""

from __future__ import annotations

import math

import pytest
import test_objectives as generic
import torch
from _objective_checks import (
    NoHostSync,
    assert_matches_reference,
    assert_one_graph,
    documented_metric_names,
    make_batch,
    naive_aggregate,
    naive_gradient,
    variant_id,
)

import pgzoo
from pgzoo.testing import random_batch

NAMES = ["gpg", "clip-cov", "kl-cov", "gmpo", "dppo-tv", "dppo-kl", "dual-clip-ppo"]

# option sets under which the covariance selection picks several tokens on a small batch (the defaults pick ≤ 1)
ACTIVE = {
    "clip-cov": dict(cov_ratio=0.15, cov_lb=0.0, cov_ub=1.5),
    "kl-cov": dict(cov_ratio=0.15, kl_coef=0.5),
}

SCENARIOS = {
    "on-policy": dict(off_policy=False),
    "off-policy": dict(scale=0.3),
    "far": dict(scale=1.5),
    "very-far": dict(scale=4.0, per_token_advantages=True),  # log-ratios up to ~±15: beyond every bound
    "per-token-adv": dict(per_token_advantages=True, scale=0.3),
    "nan-padding": dict(pad_value=float("nan"), scale=0.5, per_token_advantages=True),
    "garbage-padding": dict(pad_value=1e30, scale=0.5),
    "fully-masked-row": dict(fully_masked_row=True, scale=0.5, pad_value=float("nan")),
    "global-normalisers": dict(scale=0.5, num_sequences=11, num_tokens=37, max_tokens=20),
}


# ---------------------------------------------------------------------------------------------- naive references
def _tokens(batch, i):
    return [t for t in range(batch.seq_len) if batch.mask[i, t]]


def _top(keys: dict, n: int) -> set:
    """The n keys of largest value, the earlier (row-major) index first among equal values."""
    return set(sorted(keys, key=lambda it: (-keys[it], it))[:n])




def naive_loss(name: str, cfg, batch: pgzoo.TokenBatch, lp: torch.Tensor):
    B, T = lp.shape
    adv = batch.advantages
    old = batch.old_logprobs if batch.old_logprobs is not None else lp.detach()
    toks = {i: _tokens(batch, i) for i in range(B)}
    every = [(i, t) for i in range(B) for t in toks[i]]
    lpd = lp.detach()

    def A(i, t):
        return float(adv[i] if adv.dim() == 1 else adv[i, t])

    def lr(i, t):
        return float(lpd[i, t] - old[i, t])

    if name == "gmpo":
        n_seq = batch.num_sequences or sum(1 for i in range(B) if toks[i])
        total = lp.new_zeros(())
        for i in range(B):
            if not toks[i]:
                continue
            log_s = lp.new_zeros(())
            for t in toks[i]:
                a, x = A(i, t), lp[i, t] - old[i, t]
                sgn = (a > 0) - (a < 0)
                log_s = log_s + sgn * torch.minimum(sgn * x, sgn * torch.clamp(x, -cfg.eps_low, cfg.eps_high))
            a_bar = sum(A(i, t) for t in toks[i]) / len(toks[i])
            total = total + a_bar * torch.exp(log_s / len(toks[i])) / n_seq
        return -total

    rows = {i: [] for i in range(B)}
    if name in ("clip-cov", "kl-cov"):
        n = len(every)
        mean_a = sum(A(i, t) for i, t in every) / n
        mean_lp = sum(float(lpd[i, t]) for i, t in every) / n
        cov = {(i, t): (A(i, t) - mean_a) * (float(lpd[i, t]) - mean_lp) for i, t in every}
        k = max(int(cfg.cov_ratio * n), 1)
    if name == "clip-cov":
        lo, hi = 1 - cfg.eps_low, 1 + cfg.eps_high
        clipped = {(i, t) for i, t in every
                   if (A(i, t) > 0 and math.exp(lr(i, t)) > hi) or (A(i, t) < 0 and math.exp(lr(i, t)) < lo)}
        cands = {it: c for it, c in cov.items() if it not in clipped and cfg.cov_lb < c < cfg.cov_ub}
        chosen = _top(cands, k)
    elif name == "kl-cov":
        chosen = _top(cov, k)
    for i, t in every:
        a = A(i, t)
        r = torch.exp(lp[i, t] - old[i, t])
        if name == "gpg":
            term = a * lp[i, t]
        elif name in ("dual-clip-ppo", "clip-cov"):
            term = torch.minimum(r * a, torch.clamp(r, 1 - cfg.eps_low, 1 + cfg.eps_high) * a)
            if name == "dual-clip-ppo" and a < 0:
                term = torch.maximum(term, torch.tensor(cfg.clip_c * a, dtype=lp.dtype))
            if name == "clip-cov" and (i, t) in chosen:
                term = term * 0.0
        elif name == "kl-cov":
            term = r * a - (cfg.kl_coef * (lp[i, t] - old[i, t]).abs() if (i, t) in chosen else 0.0)
        elif name.startswith("dppo"):
            x, y = min(float(lpd[i, t]), 0.0), min(float(old[i, t]), 0.0)
            p, p_old = math.exp(x), math.exp(y)
            if cfg.divergence == "tv":
                valid = (p - p_old <= cfg.eps_high) if a > 0 else (p - p_old >= -cfg.eps_low)
            else:
                d = p_old * (y - x) + (1 - p_old) * (math.log(1 - p_old + 1e-8) - math.log(1 - p + 1e-8))
                valid = (d <= cfg.eps_high or p <= p_old) if a > 0 else (d <= cfg.eps_low or p >= p_old)
            w = min(math.exp(lr(i, t)), cfg.is_cap)
            term = float(valid) * w * a * lp[i, t]
        else:  # pragma: no cover
            raise AssertionError(name)
        rows[i].append(term)
    return -naive_aggregate(rows, batch, cfg.aggregation, lp)


def naive_grad(name, obj, batch):
    return naive_gradient(lambda cfg, b, lp: naive_loss(name, cfg, b, lp), obj, batch)


VARIANTS = [(n, {}) for n in NAMES] + [
    ("clip-cov", ACTIVE["clip-cov"]),
    ("kl-cov", ACTIVE["kl-cov"]),
    ("dppo-tv", dict(eps_low=0.05, eps_high=0.1, is_cap=1.5, aggregation="seq-mean-token-mean")),
    ("dppo-kl", dict(eps_low=0.02, eps_high=0.05, aggregation="constant")),
    ("gmpo", dict(eps_low=0.4, eps_high=0.4)),
    ("gpg", dict(aggregation="token-sum")),
    ("dual-clip-ppo", dict(clip_c=1.5, eps_high=0.28, aggregation="seq-mean-token-sum")),
]


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_gradient_matches_naive_reference(variant, scenario):
    name, options = variant
    assert_matches_reference(pgzoo.get(name, **options), lambda obj, batch: naive_grad(name, obj, batch),
                             SCENARIOS[scenario], moves=False, metrics_finite=True)


def _flag_counts(name, options, *scenarios):
    """Summed clip / selection metrics over three seeds of the scenarios."""
    total = {}
    for seed, scenario in [(seed, s) for s in scenarios for seed in range(3)]:
        out = pgzoo.get(name, **options)(random_batch(5, 7, seed=seed, **SCENARIOS[scenario]))
        for key, value in out.metrics.items():
            if key.startswith(("clip/", "cov/", "is/truncated")):
                total[key] = total.get(key, 0.0) + float(value)
    return total


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v[0] not in ("gpg",)], ids=variant_id)
def test_references_exercise_both_branches(variant):
    """Guard against a vacuous comparison: far from the old policy the bounds bite for both advantage signs, and
    (the active covariance settings) tokens are selected; on policy nothing is clipped."""
    name, options = variant
    far = _flag_counts(name, options, "far", "very-far")
    on = _flag_counts(name, options, "on-policy")
    if "clip/low_fraction" in far:
        assert far["clip/low_fraction"] > 0 and far["clip/high_fraction"] > 0, far
        assert on["clip/fraction"] == 0.0
    if name == "dual-clip-ppo":
        assert far["clip/dual_fraction"] > 0
    if options and name in ACTIVE:
        assert far["cov/selected_fraction"] > 0 and on["cov/selected_fraction"] > 0
    if name.startswith("dppo"):
        assert far["is/truncated_fraction"] > 0


# ---------------------------------------------------------------------------------------------- behaviour
def test_dual_clip_only_bounds_negative_advantages_and_is_off_for_trl_objectives():
    for name in ("grpo", "dr-grpo", "dapo"):
        assert pgzoo.get(name).config.clip_c is None
    assert pgzoo.get("dual-clip-ppo").config.clip_c == 3.0
    batch = random_batch(6, 8, seed=3, scale=1.5, per_token_advantages=True)
    g_on = pgzoo.testing.grad_wrt_logprobs(pgzoo.get("dapo", eps_high=0.2, clip_c=3.0), batch)
    g_off = pgzoo.testing.grad_wrt_logprobs(pgzoo.get("dapo", eps_high=0.2), batch)
    r = torch.exp(batch.logprobs.detach() - batch.old_logprobs)
    dual = batch.mask & (batch.advantages < 0) & (r > 3.0)
    assert dual.any()
    assert (g_on[dual] == 0).all() and (g_off[dual] != 0).all()
    torch.testing.assert_close(g_on[~dual], g_off[~dual], rtol=0, atol=0)
    pgzoo.testing.assert_same_gradient("dual-clip-ppo", pgzoo.get("dapo", eps_high=0.2, clip_c=3.0), batch)
    for bad in (1.0, 0.5, True, "3"):
        with pytest.raises(pgzoo.ConfigError, match="clip_c"):
            pgzoo.get("grpo", clip_c=bad)


def test_token_sum_aggregation():
    batch = random_batch(4, 5, seed=0, pad_value=float("nan"))
    term = torch.where(batch.mask, torch.arange(20.0, dtype=torch.float64).reshape(4, 5), float("nan"))
    expected = torch.arange(20.0, dtype=torch.float64).reshape(4, 5)[batch.mask].sum()
    assert float(pgzoo.aggregate(term, batch, "token-sum")) == float(expected)
    # a mode every token-level objective takes; it is the token-mean loss times N_tok
    g_sum = pgzoo.testing.grad_wrt_logprobs(pgzoo.get("dapo", aggregation="token-sum"), batch)
    g_mean = pgzoo.testing.grad_wrt_logprobs("dapo", batch)
    torch.testing.assert_close(g_sum, g_mean * batch.mask.sum(), rtol=1e-12, atol=1e-14)


def test_on_policy_reductions():
    batch = random_batch(6, 9, seed=7, off_policy=False)
    m = batch.mask
    reinforce = torch.where(m, -batch.advantages[:, None].expand_as(m).double(), torch.zeros(m.shape).double())
    n_tok, n_seq, lengths = m.sum(), m.any(-1).sum(), m.sum(-1, keepdim=True).clamp_min(1)
    for name in ("gpg", "dppo-tv", "dppo-kl", "dual-clip-ppo"):
        g = pgzoo.testing.grad_wrt_logprobs(name, batch)
        torch.testing.assert_close(g, reinforce / n_tok, rtol=1e-12, atol=1e-14, msg=name)
    torch.testing.assert_close(pgzoo.testing.grad_wrt_logprobs("gmpo", batch), reinforce / lengths / n_seq,
                               rtol=1e-12, atol=1e-14)
    pgzoo.testing.assert_same_gradient("gmpo", "gspo", batch, rtol=1e-12)


def test_gmpo_with_one_token_is_ppo_in_log_space():
    batch = random_batch(16, 1, seed=5, scale=0.5, padding=False)
    eps = 0.2
    grpo = pgzoo.get("grpo", eps_low=-math.expm1(-eps), eps_high=math.expm1(eps))
    pgzoo.testing.assert_same_gradient(pgzoo.get("gmpo"), grpo, batch, rtol=1e-10)
    assert 0 < float(pgzoo.get("gmpo")(batch).metrics["clip/fraction"]) < 1


def test_covariance_reductions_and_selection_rule():
    batch = random_batch(6, 8, seed=2, scale=0.4, per_token_advantages=True)
    # a band no covariance falls in selects nothing: clip-cov is PPO with token-mean (a reversed band is refused)
    pgzoo.testing.assert_same_gradient(pgzoo.get("clip-cov", cov_lb=1e9, cov_ub=2e9),
                                       pgzoo.get("dapo", eps_high=0.2), batch, rtol=1e-12)
    # β = 0: kl-cov is the unclipped surrogate (= dapo with bounds that never bite)
    pgzoo.testing.assert_same_gradient(pgzoo.get("kl-cov", kl_coef=0.0),
                                       pgzoo.get("dapo", eps_low=0.999999, eps_high=1e9), batch, rtol=1e-12)
    # the default ratio selects max(⌊2e-4·N⌋, 1) = 1 token: the one of largest covariance
    out = pgzoo.get("kl-cov")(batch)
    assert float(out.metrics["cov/selected_fraction"]) * batch.mask.sum() == pytest.approx(1.0)
    # ties: equal covariances are taken in row-major order
    from pgzoo.objectives.cov import select_top, selected_mask

    def select(key, cand, ratio_, batch):
        return selected_mask(*select_top(key, cand, ratio_, batch), key)

    key = torch.tensor([[1.0, 3.0, 3.0], [3.0, 0.5, 3.0]], dtype=torch.float64)
    mask = torch.ones(2, 3, dtype=torch.bool)
    tie = pgzoo.TokenBatch(logprobs=-torch.ones(2, 3, dtype=torch.float64), mask=mask,
                           advantages=torch.zeros(2, dtype=torch.float64))
    chosen = select(key, mask, 0.5, tie)  # n = 3 of four tied 3.0s
    assert chosen.tolist() == [[False, True, True], [True, False, False]]
    chosen = select(key, mask & (key < 2), 0.5, tie)  # fewer candidates than n: all of them
    assert chosen.tolist() == [[True, False, False], [False, True, False]]


def test_covariance_objectives_select_per_batch():
    """shard_additive is False: each micro-batch selects from its own statistics (as verl's micro-batches do)."""
    assert not pgzoo.get("clip-cov").shard_additive and not pgzoo.get("kl-cov").shard_additive
    assert all(pgzoo.get(n).shard_additive for n in NAMES if n not in ("clip-cov", "kl-cov"))
    full = random_batch(8, 6, seed=3, scale=0.4)
    obj = pgzoo.get("kl-cov", **ACTIVE["kl-cov"])
    n_seq, n_tok = int(full.mask.any(-1).sum()), int(full.mask.sum())
    parts = []
    for rows in (slice(0, 3), slice(3, 8)):
        shard = pgzoo.TokenBatch(
            logprobs=full.logprobs.detach()[rows], mask=full.mask[rows], advantages=full.advantages[rows],
            old_logprobs=full.old_logprobs[rows], num_sequences=n_seq, num_tokens=n_tok)
        parts.append(pgzoo.testing.grad_wrt_logprobs(obj, shard))
    assert not torch.allclose(torch.cat(parts), pgzoo.testing.grad_wrt_logprobs(obj, full))


def test_config_validation_names_the_key():
    cases = [("gmpo", "eps_low", -0.1), ("dppo-tv", "eps_high", 0), ("dppo-kl", "is_cap", -1.0),
             ("dppo-tv", "divergence", "js"), ("clip-cov", "cov_ratio", 0), ("clip-cov", "cov_lb", "1"),
             ("kl-cov", "kl_coef", -0.1), ("kl-cov", "cov_ratio", True), ("gpg", "aggregation", "mean"),
             ("clip-cov", "eps_low", 1.0)]
    for name, key, value in cases:
        with pytest.raises(pgzoo.ConfigError, match=key):
            pgzoo.get(name, **{key: value})
    with pytest.raises(pgzoo.ConfigError, match="level"):
        pgzoo.get("gmpo", correction={"level": "token"})


def test_defaults_are_verls():
    """verl 0.9.1's ActorConfig / PolicyLossConfig defaults (clip_ratio 0.2, clip_ratio_c 3, token-mean,
    clip_cov_ratio 2e-4, clip_cov_lb 1, clip_cov_ub 5, kl_cov_ratio 2e-4, ppo_kl_coef 0.1)."""
    expect = {
        "gpg": dict(aggregation="token-mean"),
        "clip-cov": dict(eps_low=0.2, eps_high=0.2, cov_ratio=2e-4, cov_lb=1.0, cov_ub=5.0,
                         aggregation="token-mean"),
        "kl-cov": dict(cov_ratio=2e-4, kl_coef=0.1, aggregation="token-mean"),
        "gmpo": dict(eps_low=0.2, eps_high=0.2),
        "dppo-tv": dict(divergence="tv", eps_low=0.2, eps_high=0.2, is_cap=3.0, aggregation="token-mean"),
        "dppo-kl": dict(divergence="kl", eps_low=0.2, eps_high=0.2, is_cap=3.0, aggregation="token-mean"),
        "dual-clip-ppo": dict(eps_low=0.2, eps_high=0.2, clip_c=3.0, beta=0.0, aggregation="token-mean"),
    }
    for name, values in expect.items():
        cfg = pgzoo.get(name).config
        assert {k: getattr(cfg, k) for k in values} == values, name
        assert "arXiv" in pgzoo.get(name).paper
        assert pgzoo.get(name).default_advantage in pgzoo.advantages.available()


# ---------------------------------------------------------------------------------------------- option variants
# tests/test_objective_properties.py checks every objective under its defaults and the shared options; these are the
# verl-specific option sets of VARIANTS.
OPTION_VARIANTS = [v for v in VARIANTS if v[1]]


@pytest.mark.parametrize("variant", OPTION_VARIANTS, ids=variant_id)
def test_option_variants_metrics_off_gives_the_same_loss_and_gradient(variant):
    name, options = variant
    full, bare = pgzoo.get(name, **options), pgzoo.get(name, metrics=False, **options)
    for seed, scenario in enumerate(["off-policy", "far", "per-token-adv", "nan-padding"]):
        batch = random_batch(5, 7, seed=seed, **SCENARIOS[scenario])
        out_full, g_full = generic.lib_grad(full, batch)
        out_bare, g_bare = generic.lib_grad(bare, batch)
        assert out_bare.metrics == {} and len(out_full.metrics) >= 5
        torch.testing.assert_close(out_bare.loss, out_full.loss, rtol=0, atol=0)
        torch.testing.assert_close(g_bare, g_full, rtol=0, atol=0)


def test_option_variants_metric_names_are_documented():
    seen = set()
    for name, options in OPTION_VARIANTS:
        seen |= set(pgzoo.get(name, **options)(random_batch(3, 4, seed=0)).metrics)
    undocumented = seen - documented_metric_names()
    assert not undocumented, f"undocumented metrics: {sorted(undocumented)}"


@pytest.mark.parametrize("name", sorted(ACTIVE))
def test_active_covariance_selection_compiles_without_host_sync(name, monkeypatch):
    """With several tokens selected (the defaults select one), still one graph and no host sync."""
    obj = pgzoo.get(name, **ACTIVE[name], correction={"level": "token", "mode": "mask"})
    batch = make_batch(obj, seed=0, pad_value=float("nan"))
    assert_one_graph(obj, batch)
    with NoHostSync(monkeypatch) as guard:
        obj(batch.replace(check_values=False)).loss.backward()
    assert guard.ops > 10


@pytest.mark.parametrize("seed", range(20))
def test_selection_rule_against_a_sort(seed):
    """select_top on random keys with heavy ties (few distinct values) equals a plain sort by (−key, index)."""
    from pgzoo.objectives.cov import select_top, selected_mask

    g = torch.Generator().manual_seed(seed)
    B, T = 5, 9
    key = torch.randint(0, 4, (B, T), generator=g).double()
    mask = torch.rand(B, T, generator=g) < 0.8
    cand = mask & (torch.rand(B, T, generator=g) < 0.7)
    batch = pgzoo.TokenBatch(logprobs=-torch.ones(B, T, dtype=torch.float64), mask=mask,
                             advantages=torch.zeros(B, dtype=torch.float64))
    for ratio_ in (1e-3, 0.1, 0.3, 0.9):
        got = selected_mask(*select_top(key, cand, ratio_, batch), key)
        n = max(int(ratio_ * int(mask.sum())), 1)
        flat = [(-float(key.reshape(-1)[j]), j) for j in range(B * T) if cand.reshape(-1)[j]]
        expect = torch.zeros(B * T, dtype=torch.bool)
        expect[[j for _, j in sorted(flat)[:n]]] = True
        assert torch.equal(got.reshape(-1), expect), (seed, ratio_)
