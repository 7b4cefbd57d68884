"""Every objective's loss and gradient against a naive loop over (i, t) written from docs/design.md §4, in float64."""

from __future__ import annotations

import math

import pytest
import torch

import pgzoo
from pgzoo.objectives.correction import Correction
from pgzoo.testing import random_batch

NAMES = [
    "minirl", "minirl-no-clip", "minirl-length-norm", "minirl-no-is",
    "grpo", "dr-grpo", "dapo", "cispo", "gspo", "gspo-token",
]


# ---------------------------------------------------------------------------------------------- naive references
def _clip(x, lo, hi):
    return min(max(x, lo), hi)


def naive_loss(name: str, cfg, batch: pgzoo.TokenBatch, lp: torch.Tensor, correction: Correction | None = None):
    """The docs/design.md §4 formula, one token at a time; only unmasked positions are ever read."""
    B, T = lp.shape
    m = batch.mask
    adv = batch.advantages
    old = batch.old_logprobs if batch.old_logprobs is not None else lp.detach()
    mu, ref = batch.rollout_logprobs, batch.ref_logprobs

    def A(i, t):
        return adv[i] if adv.dim() == 1 else adv[i, t]

    def tokens(i):
        return [t for t in range(T) if m[i, t]]

    n_seq = batch.num_sequences or sum(1 for i in range(B) if tokens(i))
    n_tok = batch.num_tokens or sum(len(tokens(i)) for i in range(B))
    L = batch.max_tokens or T

    def corr(i, t):
        if correction is None:
            return 1.0
        if correction.level == "token":
            log_w = float(old[i, t] - mu[i, t])
        else:
            log_w = sum(float(old[i, s] - mu[i, s]) for s in tokens(i))
            if correction.level == "geometric":
                log_w /= len(tokens(i))
        w = math.exp(log_w)
        if correction.mode == "truncate":
            return min(w, correction.cap)
        return w if correction.low <= w <= correction.high else 0.0

    total = lp.new_zeros(())
    for i in range(B):
        toks = tokens(i)
        if not toks:
            continue
        if name.startswith("minirl"):
            row = lp.new_zeros(())
            for t in toks:
                r = math.exp(float(lp.detach()[i, t] - old[i, t]))
                a = float(A(i, t))
                M = 0.0 if (a > 0 and r > 1 + cfg.eps_high) or (a < 0 and r < 1 - cfg.eps_low) else 1.0
                if not cfg.clip:
                    M = 1.0
                base = float(lp.detach()[i, t] - (mu[i, t] if cfg.train_inference_is else old[i, t]))
                w = min(math.exp(base), cfg.is_cap)
                row = row + M * w * a * lp[i, t]
            if cfg.aggregation == "seq-mean-token-mean":
                row = row / len(toks)
            total = total + row / n_seq
        elif name in ("grpo", "dr-grpo", "dapo"):
            row = lp.new_zeros(())
            for t in toks:
                r = torch.exp(lp[i, t] - old[i, t])
                a = A(i, t)
                term = torch.minimum(r * a, torch.clamp(r, 1 - cfg.eps_low, 1 + cfg.eps_high) * a)
                if cfg.beta > 0:
                    d = ref[i, t] - lp[i, t]
                    term = term - cfg.beta * (torch.exp(d) - d - 1)
                row = row + corr(i, t) * term
            if name == "grpo":
                total = total + row / len(toks) / n_seq
            elif name == "dr-grpo":
                total = total + row / (n_seq * L)
            else:
                total = total + row / n_tok
        elif name == "cispo":
            for t in toks:
                r = math.exp(float(lp.detach()[i, t] - old[i, t]))
                lo = 1 - cfg.eps_low if cfg.eps_low is not None else -math.inf
                w = _clip(r, lo, 1 + cfg.eps_high)
                total = total + corr(i, t) * w * A(i, t) * lp[i, t] / n_tok
        elif name == "gspo":
            s = torch.exp(sum(lp[i, t] - old[i, t] for t in toks) / len(toks))
            a = adv[i] if adv.dim() == 1 else sum(adv[i, t] for t in toks) / len(toks)
            term = torch.minimum(s * a, torch.clamp(s, 1 - cfg.eps_low, 1 + cfg.eps_high) * a)
            total = total + corr(i, toks[0]) * term / n_seq
        elif name == "gspo-token":
            s_val = math.exp(sum(float(lp.detach()[i, t] - old[i, t]) for t in toks) / len(toks))
            row = lp.new_zeros(())
            for t in toks:
                s = s_val * torch.exp(lp[i, t] - lp[i, t].detach())
                a = A(i, t)
                term = torch.minimum(s * a, torch.clamp(s, 1 - cfg.eps_low, 1 + cfg.eps_high) * a)
                row = row + corr(i, t) * term
            total = total + row / len(toks) / n_seq
        else:  # pragma: no cover
            raise AssertionError(name)
    return -total


def naive_grad(name, obj, batch, correction=None):
    lp = batch.logprobs.detach().clone().requires_grad_(True)
    loss = naive_loss(name, obj.config, batch, lp, correction)
    (g,) = torch.autograd.grad(loss, lp)
    return loss.detach(), torch.where(batch.mask, g, torch.zeros_like(g))


def lib_grad(obj, batch):
    lp = batch.logprobs.detach().clone().requires_grad_(True)
    out = obj(batch.replace(logprobs=lp))
    (g,) = torch.autograd.grad(out.loss, lp)
    return out, g


SCENARIOS = {
    "on-policy": dict(off_policy=False),
    "off-policy": dict(scale=0.3),
    "near": dict(scale=2e-4),  # inside GSPO's narrow band, so its unclipped branch is exercised
    "far": dict(scale=1.5),  # CISPO's cap and MiniRL's IS cap are hit
    "per-token-adv": dict(per_token_advantages=True, scale=0.3),
    "nan-padding": dict(pad_value=float("nan"), scale=0.3, per_token_advantages=True),
    "garbage-padding": dict(pad_value=1e30, scale=0.3),
    "fully-masked-row": dict(fully_masked_row=True, scale=0.3, pad_value=float("nan")),
    "global-normalisers": dict(scale=0.3, num_sequences=11, num_tokens=37, max_tokens=20),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("name", NAMES)
def test_gradient_matches_naive_reference(name, scenario):
    obj = pgzoo.get(name)
    clipped = []
    for seed in range(3):
        batch = random_batch(5, 7, seed=seed, **SCENARIOS[scenario])
        out, g = lib_grad(obj, batch)
        ref_loss, ref_g = naive_grad(name, obj, batch)
        assert torch.isfinite(out.loss)
        assert torch.isfinite(g).all(), "gradient must be finite everywhere (masked positions: exactly 0)"
        assert (g[~batch.mask] == 0).all()
        torch.testing.assert_close(out.loss.detach(), ref_loss, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(g, ref_g, rtol=1e-9, atol=1e-12)
        clipped.append(float(out.metrics["clip/fraction"]))
        for key, value in out.metrics.items():
            assert isinstance(value, torch.Tensor) and not value.requires_grad, key
            assert torch.isfinite(value).all(), key
    if scenario == "on-policy" and name != "gspo-token":
        assert max(clipped) == 0.0  # r = 1: nothing is clipped
    if scenario == "far" and name not in ("minirl-no-clip",):
        assert max(clipped) > 0.0  # the clipped branch is exercised


@pytest.mark.parametrize("scenario", ["on-policy", "off-policy", "far"])
def test_reference_branches_are_exercised(scenario):
    """Guard against a vacuous comparison: over the scenarios both clipped and unclipped tokens occur."""
    fractions = []
    for name in ("grpo", "dapo", "minirl", "gspo-token", "cispo"):
        out = pgzoo.get(name)(random_batch(5, 7, seed=1, **SCENARIOS[scenario]))
        fractions.append(float(out.metrics["clip/fraction"]))
    assert all(0.0 <= f < 1.0 for f in fractions)


CORRECTIONS = [
    Correction(level="token", mode="truncate", cap=1.1),
    Correction(level="sequence", mode="truncate", cap=1.5),
    Correction(level="geometric", mode="truncate", cap=1.05),
    Correction(level="token", mode="mask", low=0.8, high=1.25),
    Correction(level="sequence", mode="mask", low=0.5, high=2.0),
    Correction(level="geometric", mode="mask", low=0.95, high=1.05),
]


@pytest.mark.parametrize("correction", CORRECTIONS, ids=lambda c: f"{c.level}-{c.mode}")
@pytest.mark.parametrize("name", ["grpo", "dr-grpo", "dapo", "cispo", "gspo", "gspo-token"])
def test_correction_matches_naive_reference(name, correction):
    if name == "gspo" and correction.level == "token":
        with pytest.raises(pgzoo.ConfigError, match="level"):
            pgzoo.get(name, correction=correction)
        return
    obj = pgzoo.get(name, correction=correction)
    assert "rollout_logprobs" in obj.requires
    hit = []
    for seed in range(3):
        batch = random_batch(5, 7, seed=seed, scale=0.3 if name != "gspo" else 2e-4, pad_value=float("nan"))
        out, g = lib_grad(obj, batch)
        ref_loss, ref_g = naive_grad(name, obj, batch, correction)
        torch.testing.assert_close(out.loss.detach(), ref_loss, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(g, ref_g, rtol=1e-9, atol=1e-12)
        key = "correction/truncated_fraction" if correction.mode == "truncate" else "correction/masked_fraction"
        hit.append(float(out.metrics[key]))
    if name != "gspo":
        assert 0.0 < max(hit) and min(hit) < 1.0  # the thresholds actually bite, but not everywhere


def test_correction_from_dict_and_off_by_default():
    assert all(pgzoo.get(n).config.correction is None for n in ["grpo", "dr-grpo", "dapo", "cispo", "gspo"])
    obj = pgzoo.get("dapo", correction={"level": "sequence", "mode": "mask", "high": 3.0})
    assert obj.config.correction == Correction(level="sequence", mode="mask", high=3.0)
    with pytest.raises(pgzoo.ConfigError, match="valid keys"):
        pgzoo.get("grpo", correction={"levle": "token"})
    with pytest.raises(pgzoo.ConfigError, match="correction.mode"):
        pgzoo.get("grpo", correction={"mode": "clip"})
    with pytest.raises(pgzoo.ConfigError, match="correction.cap"):
        Correction(cap=0)
    with pytest.raises(pgzoo.ConfigError, match="correction.high"):
        Correction(mode="mask", low=2.0, high=1.0)
    with pytest.raises(pgzoo.ConfigError):
        pgzoo.get("grpo", correction="token")


def test_minirl_family_takes_no_correction():
    with pytest.raises(pgzoo.ConfigError, match="valid keys"):
        pgzoo.get("minirl", correction={"level": "token"})


# ---------------------------------------------------------------------------------------------- reductions
def test_minirl_on_policy_is_reinforce_with_train_inference_weight():
    batch = random_batch(6, 9, seed=3, off_policy=False, scale=0.8, per_token_advantages=True)
    g = pgzoo.testing.grad_wrt_logprobs("minirl", batch)
    lp, mu, m = batch.logprobs.detach(), batch.rollout_logprobs, batch.mask
    n_seq = m.any(-1).sum()
    w = torch.exp(lp - mu).clamp(max=5.0)
    expected = torch.where(m, -w * batch.advantages / n_seq, torch.zeros_like(lp))
    torch.testing.assert_close(g, expected, rtol=1e-12, atol=1e-14)
    assert (torch.exp(lp - mu)[m] > 5.0).any() and (w[m] != 1).all()  # the weight is not trivially 1 here


def test_minirl_no_is_on_policy_is_reinforce():
    batch = random_batch(6, 9, seed=4, off_policy=False, scale=0.8)
    g = pgzoo.testing.grad_wrt_logprobs("minirl-no-is", batch)
    m = batch.mask
    expected = torch.where(m, -batch.advantages[:, None] / m.any(-1).sum(), torch.zeros_like(g))
    torch.testing.assert_close(g, expected, rtol=1e-12, atol=1e-14)
    # and it ignores the rollout logprobs entirely
    g2 = pgzoo.testing.grad_wrt_logprobs("minirl-no-is", batch.replace(rollout_logprobs=None))
    torch.testing.assert_close(g, g2, rtol=0, atol=0)


def test_minirl_does_not_substitute_old_logprobs():
    batch = random_batch(3, 4, seed=0, rollout=False)
    with pytest.raises(pgzoo.BatchError, match="rollout_logprobs"):
        pgzoo.get("minirl")(batch)
    # passing old_logprobs explicitly as the rollout logprobs is the documented way
    pgzoo.get("minirl")(batch.replace(rollout_logprobs=batch.old_logprobs))


def test_gspo_with_one_token_is_grpo():
    batch = random_batch(16, 1, seed=5, scale=5e-4, padding=False)
    eps = dict(eps_low=3e-4, eps_high=4e-4)
    pgzoo.testing.assert_same_gradient(pgzoo.get("gspo"), pgzoo.get("grpo", **eps), batch, rtol=1e-10)
    out_a, out_b = pgzoo.get("gspo")(batch), pgzoo.get("grpo", **eps)(batch)
    torch.testing.assert_close(out_a.loss, out_b.loss)
    assert 0 < float(out_a.metrics["clip/fraction"]) < 1


def test_gspo_token_equals_gspo_with_sequence_advantages():
    batch = random_batch(8, 6, seed=6, scale=3e-4)
    pgzoo.testing.assert_same_gradient("gspo", "gspo-token", batch, rtol=1e-10)


def test_on_policy_family_members_are_reinforce_up_to_normalisation():
    batch = random_batch(6, 9, seed=7, off_policy=False)
    m = batch.mask
    reinforce = torch.where(m, -batch.advantages[:, None].expand_as(m).double(), torch.zeros(m.shape).double())
    n_seq, n_tok, L = m.any(-1).sum(), m.sum(), m.shape[1]
    lengths = m.sum(-1, keepdim=True).clamp_min(1)
    expected = {
        "dapo": reinforce / n_tok,
        "dr-grpo": reinforce / (n_seq * L),
        "grpo": reinforce / lengths / n_seq,
        "cispo": reinforce / n_tok,
        "minirl-no-is": reinforce / n_seq,
    }
    for name, g in expected.items():
        torch.testing.assert_close(pgzoo.testing.grad_wrt_logprobs(name, batch), g, rtol=1e-12, atol=1e-14)


def test_grpo_kl_requires_reference_and_matches_k3():
    obj = pgzoo.get("grpo", beta=0.1)
    assert "ref_logprobs" in obj.requires
    with pytest.raises(pgzoo.BatchError, match="ref_logprobs"):
        obj(random_batch(3, 4, ref=False))
    batch = random_batch(4, 5, seed=2, off_policy=False, scale=0.5)
    out = obj(batch)
    d = (batch.ref_logprobs - batch.logprobs.detach())[batch.mask]
    torch.testing.assert_close(out.metrics["kl/ref_k3"], (torch.exp(d) - d - 1).mean())
    assert "ref_logprobs" not in pgzoo.get("grpo").requires


# Robustness (extreme log-ratios, masked values, token-less shards, float32 against float64) is checked for every
# registered objective in tests/test_objective_properties.py.
def test_config_validation_names_the_key():
    with pytest.raises(pgzoo.ConfigError, match="eps_low"):
        pgzoo.get("grpo", eps_low=1.5)
    with pytest.raises(pgzoo.ConfigError, match="eps_high"):
        pgzoo.get("dapo", eps_high=-0.1)
    with pytest.raises(pgzoo.ConfigError, match="is_cap"):
        pgzoo.get("minirl", is_cap=0)
    with pytest.raises(pgzoo.ConfigError, match="beta"):
        pgzoo.get("grpo", beta=-1)
    with pytest.raises(pgzoo.ConfigError, match="aggregation"):
        pgzoo.get("dapo", aggregation="mean")
    assert pgzoo.get("cispo", eps_low=0.5).config.eps_low == 0.5
    assert pgzoo.get("cispo", eps_high=None).config.eps_high is None


def test_defaults_match_design_table():
    expect = {
        "minirl": dict(eps_low=0.2, eps_high=0.27, is_cap=5.0),
        "grpo": dict(eps_low=0.2, eps_high=0.2, beta=0.0),
        "dr-grpo": dict(eps_low=0.2, eps_high=0.2),
        "dapo": dict(eps_low=0.2, eps_high=0.28),
        "cispo": dict(eps_low=None, eps_high=4.0),
        "gspo": dict(eps_low=3e-4, eps_high=4e-4),
        "gspo-token": dict(eps_low=3e-4, eps_high=4e-4),
    }
    for name, values in expect.items():
        cfg = pgzoo.get(name).config
        assert {k: getattr(cfg, k) for k in values} == values, name
    adv = {n: pgzoo.get(n).default_advantage for n in NAMES}
    assert adv == {
        "minirl": "group-mean", "minirl-no-clip": "group-mean", "minirl-length-norm": "group-mean",
        "minirl-no-is": "group-mean", "grpo": "group-mean-std", "dr-grpo": "group-mean", "dapo": "group-mean-std",
        "cispo": "group-mean-std", "gspo": "group-mean-std", "gspo-token": "group-mean-std",
    }
    assert pgzoo.get("minirl").requires == {"rollout_logprobs"}
    assert pgzoo.get("minirl-no-is").requires == frozenset()
    assert pgzoo.get("grpo", default_advantage="leave-one-out").default_advantage == "leave-one-out"
    assert "2503.20783" in pgzoo.get("dr-grpo").paper and "2503.14476" in pgzoo.get("dapo").paper
    assert all("arXiv" in pgzoo.get(n).paper for n in NAMES)
    with pytest.raises(pgzoo.UnknownNameError, match="group-mean"):
        pgzoo.get("grpo", default_advantage="group-mean-sdt")


# ---------------------------------------------------------------------------------------------- metrics=False
# (bit-identical loss and gradient for every objective and option set: tests/test_objective_properties.py)
def test_metrics_flag_is_validated():
    with pytest.raises(pgzoo.ConfigError, match="metrics="):
        pgzoo.get("minirl", metrics="no")
    with pytest.raises(pgzoo.ConfigError, match="default_advantage, paper, metrics"):
        pgzoo.get("minirl", metrix=False)
