"""The objectives from ROLL (topr, raft++), prime-rl (prime-ipo / ipo), the services' loss names
(importance-sampling, cross-entropy) and verl's dro (kimi15), the KL estimators abs and k1+/k3+/low-var-k3+, and the
estimators reward, group-mean-batch-std and maxrl — each against a naive float64 loop written from its module's
docstring formula, reading only unmasked positions, one token at a time. Every batch here has NaN (or huge garbage)
at masked positions; the scenarios include a fully masked row and per-token advantages.

The properties every objective owes (micro-batches, compile, extreme ratios, ...) are checked for these too by
tests/test_objective_properties.py; the comparisons with verl's own code are in tests/test_verl_peer_losses.py.
"""

from __future__ import annotations

import math

import pytest
import test_objectives as generic
import torch
from _objective_checks import (
    assert_matches_reference,
    naive_aggregate,
    naive_gradient,
    variant_id,
)

import pgzoo
from pgzoo.testing import random_batch

NAN = float("nan")

SCENARIOS = {
    "on-policy": dict(off_policy=False, pad_value=NAN),
    "off-policy": dict(scale=0.3, pad_value=NAN),
    "far": dict(scale=1.5, pad_value=NAN),
    "per-token-adv": dict(per_token_advantages=True, scale=0.5, pad_value=NAN),
    "fully-masked-row": dict(fully_masked_row=True, scale=0.5, pad_value=NAN, per_token_advantages=True),
    "garbage-padding": dict(pad_value=1e30, scale=0.5),
    "global-normalisers": dict(scale=0.5, num_sequences=11, num_tokens=37, max_tokens=20, pad_value=NAN),
}


def _rows(batch):
    B, T = batch.mask.shape
    return {i: [t for t in range(T) if batch.mask[i, t]] for i in range(B)}




def naive_loss(name: str, cfg, batch: pgzoo.TokenBatch, lp: torch.Tensor):
    adv = batch.advantages
    old = batch.old_logprobs if batch.old_logprobs is not None else lp.detach()
    rows = {i: [] for i in range(lp.shape[0])}
    for i, toks in _rows(batch).items():
        for t in toks:
            a = float(adv[i] if adv.dim() == 1 else adv[i, t])
            o = float(old[i, t])
            x = lp[i, t]
            lr = x - o
            if name == "topr":
                if a > 0:
                    term = cfg.positive_weight * a * x
                else:
                    term = cfg.negative_weight * min(math.exp(float(lr.detach())), 1.0) * a * x
            elif name == "raft++":
                r = torch.exp(lr)
                term = torch.minimum(r * a, torch.clamp(r, 1 - cfg.eps_low, 1 + cfg.eps_high) * a)
                if a < 0:
                    term = torch.maximum(term, torch.tensor(cfg.clip_c * a, dtype=lp.dtype))
            elif name in ("prime-ipo", "ipo"):
                p, p_old = math.exp(min(float(x), 0.0)), math.exp(min(o, 0.0))
                keep = abs(p - p_old) <= cfg.threshold
                term = (cfg.adv_tau * torch.exp(lr) * a if keep else 0.0) - cfg.kl_tau * lr * lr
            elif name == "importance-sampling":
                term = torch.exp(lr) * a
            elif name == "cross-entropy":
                term = x
            elif name in ("dro", "kimi15"):
                term = a * x - 0.5 * cfg.tau * lr * lr
            else:  # pragma: no cover
                raise AssertionError(name)
            rows[i].append(term)
    return -naive_aggregate(rows, batch, cfg.aggregation, lp)


def naive_grad(name, obj, batch):
    return naive_gradient(lambda cfg, b, lp: naive_loss(name, cfg, b, lp), obj, batch)


VARIANTS = [
    ("topr", {}), ("topr", dict(positive_weight=0.5, negative_weight=2.0, aggregation="token-mean")),
    ("raft++", {}), ("raft++", dict(eps_high=0.28, aggregation="token-mean")),
    ("prime-ipo", {}), ("ipo", dict(threshold=0.02, adv_tau=0.5, kl_tau=0.1, aggregation="seq-mean-token-mean")),
    ("importance-sampling", {}), ("importance-sampling", dict(aggregation="token-mean")),
    ("cross-entropy", {}), ("cross-entropy", dict(aggregation="constant")),
    ("dro", {}), ("kimi15", dict(tau=1.0, aggregation="seq-mean-token-sum")),
]


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_gradient_matches_naive_reference(variant, scenario):
    name, options = variant
    # cross-entropy's gradient is -m whatever the batch: "moves" says nothing there
    assert_matches_reference(pgzoo.get(name, **options), lambda obj, batch: naive_grad(name, obj, batch),
                             SCENARIOS[scenario], moves=name != "cross-entropy")


def _metric_sum(name, options, key, scenario, seeds=range(3)):
    return sum(float(pgzoo.get(name, **options)(random_batch(5, 7, seed=s, **SCENARIOS[scenario])).metrics[key])
               for s in seeds)


def test_references_exercise_both_branches():
    """Guard against vacuous comparisons: far off policy, TOPR truncates negative weights and IPO drops tokens; on
    policy neither does; raft++ clips."""
    assert _metric_sum("topr", {}, "is/truncated_fraction", "far") > 0
    assert _metric_sum("topr", {}, "is/truncated_fraction", "on-policy") == 0
    assert 0 < _metric_sum("topr", {}, "topr/negative_fraction", "far") < 3
    assert _metric_sum("prime-ipo", {}, "ipo/masked_fraction", "far") > 0
    assert _metric_sum("prime-ipo", {}, "ipo/masked_fraction", "on-policy") == 0
    assert _metric_sum("raft++", {}, "clip/fraction", "far") > 0


def test_on_policy_reductions():
    batch = random_batch(6, 9, seed=7, off_policy=False, pad_value=NAN)
    m = batch.mask
    reinforce = torch.where(m, -batch.advantages[:, None].expand_as(m).double(), torch.zeros(m.shape).double())
    n_tok, n_seq = m.sum(), m.any(-1).sum()
    grad = pgzoo.testing.grad_wrt_logprobs
    torch.testing.assert_close(grad("topr", batch), reinforce / n_seq, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad("prime-ipo", batch), reinforce / n_tok, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad("dro", batch), reinforce / n_tok, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad("importance-sampling", batch), reinforce, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad("cross-entropy", batch), -m.double(), rtol=0, atol=0)
    pgzoo.testing.assert_same_gradient("dro", "gpg", batch, rtol=1e-12)


def test_cross_entropy_ignores_advantages_and_old_logprobs():
    a = random_batch(4, 6, seed=1, pad_value=NAN)
    b = a.replace(advantages=-3.0 * a.advantages, old_logprobs=a.old_logprobs + 1.0)
    torch.testing.assert_close(pgzoo.testing.grad_wrt_logprobs("cross-entropy", a),
                               pgzoo.testing.grad_wrt_logprobs("cross-entropy", b), rtol=0, atol=0)


def test_topr_splits_by_advantage_sign_and_never_upweights_negatives():
    batch = random_batch(6, 8, seed=3, scale=1.5, per_token_advantages=True, pad_value=NAN)
    g = pgzoo.testing.grad_wrt_logprobs("topr", batch)
    gpg = pgzoo.testing.grad_wrt_logprobs(pgzoo.get("gpg", aggregation="seq-mean-token-sum"), batch)
    adv = torch.where(batch.mask, batch.advantages, 0.0)
    pos, neg = batch.mask & (adv > 0), batch.mask & (adv < 0)
    torch.testing.assert_close(g[pos], gpg[pos], rtol=1e-12, atol=0)  # REINFORCE on the positives
    assert (g[neg].abs() <= gpg[neg].abs() + 1e-15).all() and (g[neg].abs() < gpg[neg].abs()).any()


def test_ipo_region_is_symmetric_in_the_advantage():
    """A token outside the region loses its policy gradient whatever the sign of A (dppo-tv's depends on it)."""
    batch = random_batch(6, 8, seed=4, scale=1.5, per_token_advantages=True, pad_value=NAN)
    obj = pgzoo.get("prime-ipo", kl_tau=0.0)
    g = pgzoo.testing.grad_wrt_logprobs(obj, batch)
    p, p_old = batch.logprobs.detach().clamp(max=0).exp(), batch.old_logprobs.clamp(max=0).exp()
    outside = batch.mask & ((p - p_old).abs() > 0.1)
    adv = torch.where(batch.mask, batch.advantages, 0.0)
    assert (outside & (adv > 0)).any() and (outside & (adv < 0)).any()
    assert (g[outside] == 0).all() and (g[batch.mask & ~outside & (adv != 0)] != 0).all()


def test_defaults_are_the_origins():
    expect = {
        "topr": dict(positive_weight=1.0, negative_weight=1.0, aggregation="seq-mean-token-sum"),
        "raft++": dict(eps_low=0.2, eps_high=0.2, clip_c=1.4, aggregation="seq-mean-token-mean"),
        "prime-ipo": dict(threshold=0.1, adv_tau=1.0, kl_tau=1e-3, aggregation="token-mean"),
        "importance-sampling": dict(aggregation="token-sum"),
        "cross-entropy": dict(aggregation="token-sum"),
        "dro": dict(tau=0.1, aggregation="token-mean"),
    }
    for name, values in expect.items():
        cfg = pgzoo.get(name).config
        assert {k: getattr(cfg, k) for k in values} == values, name
    assert pgzoo.get("raft++").default_advantage == "reward"
    assert pgzoo.get("ipo").config == pgzoo.get("prime-ipo").config
    assert pgzoo.get("kimi15").config == pgzoo.get("dro").config
    # the origins' own spellings reach the same entries
    assert pgzoo.get("importance_sampling").name == "importance-sampling"
    assert pgzoo.get("cross_entropy").name == "cross-entropy"


def test_config_validation_names_the_key():
    cases = [("topr", "positive_weight", -1.0), ("topr", "negative_weight", "1"), ("topr", "aggregation", "mean"),
             ("prime-ipo", "threshold", -0.1), ("prime-ipo", "kl_tau", float("inf")), ("ipo", "adv_tau", True),
             ("dro", "tau", 0.0), ("kimi15", "tau", -1.0), ("importance-sampling", "aggregation", "seq-mean"),
             ("cross-entropy", "aggregation", "sum"), ("raft++", "clip_c", 1.0)]
    for name, key, value in cases:
        with pytest.raises(pgzoo.ConfigError, match=key):
            pgzoo.get(name, **{key: value})


# ---------------------------------------------------------------------------------------------- KL estimators
def test_new_kl_estimators_value_and_gradient():
    """abs: value and gradient of |lp − ref|; the + forms: the base estimator's value, k2's gradient lp − ref."""
    batch = random_batch(5, 7, seed=2, scale=0.8, pad_value=NAN)
    m = batch.mask
    zero = batch.replace(advantages=torch.zeros_like(batch.advantages))
    n_tok = m.sum()
    lp, ref = batch.logprobs.detach(), batch.ref_logprobs
    d = torch.where(m, ref - lp, 0.0)
    values = {"abs": d.abs(), "k1+": -d, "k3+": torch.expm1(d) - d,
              "low-var-k3+": (torch.expm1(d) - d).clamp(-10, 10)}
    for kl, value in values.items():
        obj = pgzoo.get("gpg", beta=1.0, kl=kl)
        out, g = generic.lib_grad(obj, zero)
        torch.testing.assert_close(out.loss.detach(), (value * m).sum() / n_tok, rtol=1e-12, atol=1e-14)
        grad = -torch.sign(d) if kl == "abs" else -d  # ∂|lp − ref|/∂lp, and k2's ∂/∂lp = lp − ref = −d
        torch.testing.assert_close(g, torch.where(m, grad, 0.0) / n_tok, rtol=1e-12, atol=1e-14)
        base = kl.removesuffix("+").replace("-", "_")
        assert f"kl/ref_{base}" in out.metrics
    with pytest.raises(pgzoo.ConfigError, match="kl"):
        pgzoo.get("gpg", beta=1.0, kl="k2++")


def test_straight_through_clamp_keeps_the_k2_gradient():
    """kl_clamp clamps the value; the gradient stays k2's (verl's kl_penalty)."""
    batch = random_batch(4, 6, seed=5, scale=3.0, pad_value=NAN).replace(advantages=torch.zeros(4, dtype=torch.float64))
    out, g = generic.lib_grad(pgzoo.get("gpg", beta=1.0, kl="k3+", kl_clamp=0.5), batch)
    m = batch.mask
    d = torch.where(m, batch.ref_logprobs - batch.logprobs.detach(), 0.0)
    torch.testing.assert_close(g, torch.where(m, -d, 0.0) / m.sum(), rtol=1e-12, atol=1e-14)
    assert float(out.metrics["kl/ref_k3"]) <= 0.5


# ---------------------------------------------------------------------------------------------- estimators
def _groups(rewards, ids):
    return {g: [float(rewards[j]) for j in range(len(ids)) if ids[j] == g] for g in set(ids.tolist())}


@pytest.mark.parametrize("seed", range(4))
def test_new_estimators_against_loops(seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 4, (14,), generator=g)
    rewards = (torch.rand(14, generator=g, dtype=torch.float64) < 0.4).double()
    rewards[ids == 0] = 1.0  # a constant group
    groups = _groups(rewards, ids)
    all_r = [float(x) for x in rewards]
    mean_b = sum(all_r) / len(all_r)
    std_b = math.sqrt(sum((x - mean_b) ** 2 for x in all_r) / (len(all_r) - 1))
    for name in ("reward", "group-mean-batch-std", "maxrl"):
        got = pgzoo.advantages.compute(name, rewards, group_ids=ids)
        for j in range(14):
            grp = groups[int(ids[j])]
            mean_g, r = sum(grp) / len(grp), all_r[j]
            constant = len(set(grp)) == 1
            if name == "reward":
                want = r
            elif name == "group-mean-batch-std":
                want = 0.0 if constant else (r - mean_g) / (std_b + 1e-4)
            else:
                want = 0.0 if constant or len(grp) < 2 else (r - mean_g) / (mean_g + 1e-6)
            assert float(got[j]) == pytest.approx(want, rel=1e-12, abs=1e-12), (name, j)
    assert (pgzoo.advantages.compute("group-mean-batch-std", rewards, group_ids=ids)[ids == 0] == 0).all()


def test_group_mean_batch_std_is_trls_scale_rewards_batch():
    """TRL 1.16's ``scale_rewards="batch"`` in ``GRPOTrainer._generate_and_score_completions``: the group mean, the
    std of the whole batch from TRL's own ``nanstd``, eps 1e-4 (rewarded rows only: no unscorable NaN here)."""
    trl_utils = pytest.importorskip("trl.trainer.utils")
    g = torch.Generator().manual_seed(0)
    G = 4
    rewards = torch.rand(16, generator=g, dtype=torch.float64).round(decimals=1)
    mean_grouped = torch.nanmean(rewards.view(-1, G), dim=1).repeat_interleave(G, dim=0)
    std = trl_utils.nanstd(rewards).expand_as(rewards)
    trl_adv = (rewards - mean_grouped) / (std + 1e-4)
    ours = pgzoo.advantages.compute("group-mean-batch-std", rewards, group_size=G)
    # TRL's Bessel factor count/(count − 1) divides two int64 counts, which gives float32: its std carries a float32
    # rounding (relative ~3e-8) even in float64; pgzoo's is float64 throughout
    torch.testing.assert_close(ours, trl_adv, rtol=1e-7, atol=1e-12)
    assert not torch.allclose(ours, pgzoo.advantages.compute("group-mean-std", rewards, group_size=G, eps=1e-4))


def test_maxrl_refuses_negative_rewards_and_upweights_hard_prompts():
    with pytest.raises(pgzoo.ConfigError, match="maxrl"):
        pgzoo.advantages.compute("maxrl", torch.tensor([1.0, -1.0]), group_size=2)
    # one success in 4 (a hard prompt) against three in 4 (an easy one): the hard prompt's success weighs 9x more
    adv = pgzoo.advantages.compute("maxrl", torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 0]), group_size=4)
    assert float(adv[0]) == pytest.approx(0.75 / (0.25 + 1e-6)) and float(adv[4]) == pytest.approx(0.25 / (0.75 + 1e-6))
    assert "maxrl" in pgzoo.advantages.trainer_estimators() and "reward" in pgzoo.advantages.trainer_estimators()
