"""pgzoo against verl 0.9.1's own policy losses (``verl.trainer.ppo.core_algos``), gradient for gradient.

Each test builds one set of float64 tensors, calls the function verl registers with ``register_policy_loss`` (through
``get_policy_loss_fn``) with an ``ActorConfig`` holding the settings, and pgzoo's objective with the matching
settings, and compares the loss and ∂loss/∂log_prob at every unmasked token. verl reads every position (it
multiplies by the mask), so its masked positions hold zeros; pgzoo's hold NaN, which must not matter.

``make install`` installs verl 0.9.1 without its dependencies plus the few small packages its import needs (see the
Makefile); without them this module is skipped, saying why.
"""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

import pgzoo

try:
    from verl.trainer.ppo import core_algos
    from verl.workers.config import ActorConfig, PolicyLossConfig
except ImportError as exc:  # pragma: no cover - depends on the environment
    pytest.skip(f"verl 0.9.1 is not importable ({exc}); `make install` installs it", allow_module_level=True)

if importlib.metadata.version("verl") != "0.9.1":  # pragma: no cover
    pytest.skip(f"these comparisons pin verl 0.9.1, found {importlib.metadata.version('verl')}",
                allow_module_level=True)

AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
PGZOO_AGG = {"seq-mean-token-sum-norm": "constant"}  # the one verl mode with another name in pgzoo


# ---------------------------------------------------------------------------------------------- inputs
def make_inputs(seed, B=6, T=9, scale=0.5, per_token=False, fully_masked_row=False):
    """Log-probabilities ≤ 0 (DPPO reads them as probabilities), ragged mask, advantages of both signs."""
    g = torch.Generator().manual_seed(seed)
    lp = -(torch.rand(B, T, generator=g, dtype=torch.float64) * 3.0 + 0.02)
    old = (lp + scale * torch.randn(B, T, generator=g, dtype=torch.float64)).clamp(max=-1e-4)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None] < lengths[:, None]
    if fully_masked_row:
        mask[-1] = False
    adv = torch.randn(B, T, generator=g, dtype=torch.float64) if per_token else \
        torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, T)
    adv = torch.where(mask, adv, 0.0)  # verl's advantages are zero outside the response
    return lp, old, adv, mask


def verl_grad(loss_mode, lp, old, adv, mask, agg="token-mean", *, policy_loss=None, global_batch_info=None,
              **actor):
    config = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, loss_agg_mode=agg,
                         policy_loss=PolicyLossConfig(loss_mode=loss_mode, **(policy_loss or {})), **actor)
    config.global_batch_info.update(global_batch_info or {})  # what verl's actor fills in before the loss
    x = torch.where(mask, lp, 0.0).requires_grad_(True)
    fn = core_algos.get_policy_loss_fn(loss_mode)
    loss, _ = fn(old_log_prob=torch.where(mask, old, 0.0), log_prob=x, advantages=adv,
                 response_mask=mask.to(torch.float64), loss_agg_mode=agg, config=config)
    (g,) = torch.autograd.grad(loss, x)
    return loss.detach(), torch.where(mask, g, 0.0)


def pgzoo_grad(objective, lp, old, adv, mask, *, seq_adv=None, **batch_kwargs):
    nan = float("nan")
    x = torch.where(mask, lp, nan).requires_grad_(True)
    batch = pgzoo.TokenBatch(logprobs=x, mask=mask, old_logprobs=torch.where(mask, old, nan),
                             advantages=seq_adv if seq_adv is not None else torch.where(mask, adv, nan),
                             **batch_kwargs)
    out = objective(batch)
    (g,) = torch.autograd.grad(out.loss, x)
    return out.loss.detach(), torch.where(mask, g, 0.0), out


def assert_same(verl_side, pgzoo_side, rtol=1e-7, atol=1e-11):
    (lv, gv), (lz, gz) = verl_side, pgzoo_side[:2]
    assert torch.isfinite(gz).all()
    torch.testing.assert_close(lz, lv, rtol=rtol, atol=atol)
    torch.testing.assert_close(gz, gv, rtol=rtol, atol=atol)
    assert gv.abs().sum() > 0  # a comparison of two zero gradients would prove nothing


SEEDS = range(3)
SCALES = [0.05, 0.5, 2.0]  # near, off-policy, far outside every bound


# ---------------------------------------------------------------------------------------------- vanilla (+ dual clip)
@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("scale", SCALES)
def test_vanilla_dual_clip_every_aggregation(agg, scale):
    hits = 0
    for seed in SEEDS:
        lp, old, adv, mask = make_inputs(seed, scale=scale, per_token=seed == 2)
        v = verl_grad("vanilla", lp, old, adv, mask, agg)  # ActorConfig defaults: ε 0.2/0.2, clip_ratio_c 3
        obj = pgzoo.get("dual-clip-ppo", aggregation=PGZOO_AGG.get(agg, agg))
        z = pgzoo_grad(obj, lp, old, adv, mask)
        assert_same(v, z)
        hits += float(z[2].metrics["clip/dual_fraction"])
    if scale == 2.0:
        assert hits > 0  # the dual clip bites


@pytest.mark.parametrize("agg", AGG_MODES)
def test_global_normalisers(agg):
    """verl's global batch info (filled by its actor) is pgzoo's normalisers: batch_num_tokens = num_tokens,
    global_batch_size = num_sequences, loss_scale_factor = max_tokens (dp_size 1)."""
    lp, old, adv, mask = make_inputs(0, scale=0.5)
    info = dict(dp_size=1, batch_num_tokens=37, global_batch_size=11, loss_scale_factor=20)
    v = verl_grad("vanilla", lp, old, adv, mask, agg, global_batch_info=info)
    z = pgzoo_grad(pgzoo.get("dual-clip-ppo", aggregation=PGZOO_AGG.get(agg, agg)), lp, old, adv, mask,
                   num_tokens=37, num_sequences=11, max_tokens=20)
    assert_same(v, z)


@pytest.mark.parametrize("name,verl_agg", [("grpo", "seq-mean-token-mean"), ("dapo", "token-mean"),
                                           ("dr-grpo", "seq-mean-token-sum-norm")])
def test_trl_family_is_vanilla_without_dual_clip(name, verl_agg):
    """grpo/dapo/dr-grpo (no dual clip by default) are verl's vanilla with clip_ratio_c out of reach; with clip_c
    set they are vanilla with it."""
    obj = pgzoo.get(name)
    for seed, scale in zip(SEEDS, SCALES):
        lp, old, adv, mask = make_inputs(seed, scale=scale)
        eps = dict(clip_ratio_low=obj.config.eps_low, clip_ratio_high=obj.config.eps_high)
        assert_same(verl_grad("vanilla", lp, old, adv, mask, verl_agg, clip_ratio_c=1e9, **eps),
                    pgzoo_grad(obj, lp, old, adv, mask))
        assert_same(verl_grad("vanilla", lp, old, adv, mask, verl_agg, clip_ratio_c=2.0, **eps),
                    pgzoo_grad(pgzoo.get(name, clip_c=2.0), lp, old, adv, mask))


# ---------------------------------------------------------------------------------------------- gpg
@pytest.mark.parametrize("agg", AGG_MODES)
def test_gpg(agg):
    for seed in SEEDS:
        lp, old, adv, mask = make_inputs(seed, per_token=seed == 1)
        assert_same(verl_grad("gpg", lp, old, adv, mask, agg),
                    pgzoo_grad(pgzoo.get("gpg", aggregation=PGZOO_AGG.get(agg, agg)), lp, old, adv, mask))


# ---------------------------------------------------------------------------------------------- clip-cov, kl-cov
def _clip_cov_order(lp, old, adv, mask, eps, lb, ub):
    """The permutation verl's ``torch.randperm`` must return for its draw to equal pgzoo's ranking: verl's
    candidates (row-major, as ``torch.nonzero`` lists them) ordered by covariance, largest first, ties by index."""
    n = mask.sum()
    cov = (adv - (adv * mask).sum() / n) * (lp - (lp * mask).sum() / n)
    r = torch.exp(lp - old)
    clipped = ((adv > 0) & (r > 1 + eps)) | ((adv < 0) & (r < 1 - eps))
    cand = mask & ~clipped & (cov > lb) & (cov < ub)
    values = cov[cand].tolist()
    return sorted(range(len(values)), key=lambda j: (-values[j], j))


@pytest.mark.parametrize("settings", [
    dict(),                                                   # verl's defaults: ρ 2e-4 (one token), band (1, 5)
    dict(clip_cov_ratio=0.15, clip_cov_lb=0.0, clip_cov_ub=1.5),
    dict(clip_cov_ratio=1.0, clip_cov_lb=-1.0, clip_cov_ub=1.0),  # n ≥ candidates: verl's draw takes them all
], ids=["defaults", "active", "all-candidates"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_clip_cov(settings, agg, monkeypatch):
    ours = {"clip_cov_ratio": "cov_ratio", "clip_cov_lb": "cov_lb", "clip_cov_ub": "cov_ub"}
    obj = pgzoo.get("clip-cov", aggregation=agg, **{ours[k]: v for k, v in settings.items()})
    selected = 0.0
    for seed, scale in zip(SEEDS, SCALES):
        lp, old, adv, mask = make_inputs(seed, scale=scale, per_token=True)
        order = _clip_cov_order(lp, old, adv, mask, 0.2, obj.config.cov_lb, obj.config.cov_ub)

        def randperm(n, *args, **kwargs):
            assert n == len(order), "the candidates differ from verl's"
            return torch.tensor(order, dtype=torch.long)

        with monkeypatch.context() as patch:
            patch.setattr(torch, "randperm", randperm)  # verl's random draw, replaced by pgzoo's ranking
            v = verl_grad("clip_cov", lp, old, adv, mask, agg, policy_loss=settings)
        z = pgzoo_grad(obj, lp, old, adv, mask)
        assert_same(v, z)
        selected += float(z[2].metrics["cov/selected_fraction"])
        if len(order) <= max(int(obj.config.cov_ratio * int(mask.sum())), 1):  # no draw at all: verl as shipped
            assert_same(verl_grad("clip_cov", lp, old, adv, mask, agg, policy_loss=settings), z)
    if settings:
        assert selected > 0


@pytest.mark.parametrize("settings", [dict(), dict(kl_cov_ratio=0.15, ppo_kl_coef=0.5)], ids=["defaults", "active"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum"])
def test_kl_cov(settings, agg):
    obj = pgzoo.get("kl-cov", aggregation=agg, cov_ratio=settings.get("kl_cov_ratio", 2e-4),
                    kl_coef=settings.get("ppo_kl_coef", 0.1))
    for seed, scale in zip(SEEDS, SCALES):
        lp, old, adv, mask = make_inputs(seed, scale=scale, per_token=seed != 1)
        z = pgzoo_grad(obj, lp, old, adv, mask)
        assert_same(verl_grad("kl_cov", lp, old, adv, mask, agg, policy_loss=settings), z)
        assert float(z[2].metrics["cov/selected_fraction"]) > 0


# ---------------------------------------------------------------------------------------------- gmpo
@pytest.mark.parametrize("eps", [0.2, 0.4])
@pytest.mark.parametrize("scale", SCALES)
def test_geo_mean(eps, scale):
    obj = pgzoo.get("gmpo", eps_low=eps, eps_high=eps)
    for seed in SEEDS:
        # a fully masked row counts in verl's mean over rows: pgzoo gets num_sequences = B for the same count
        lp, old, adv, mask = make_inputs(seed, scale=scale, fully_masked_row=seed == 0)
        assert_same(verl_grad("geo_mean", lp, old, adv, mask, clip_ratio_low=eps, clip_ratio_high=eps),
                    pgzoo_grad(obj, lp, old, adv, mask, num_sequences=lp.shape[0]))
        # per-sequence advantages given as [B]: the same loss
        assert_same(verl_grad("geo_mean", lp, old, adv, mask, clip_ratio_low=eps, clip_ratio_high=eps),
                    pgzoo_grad(obj, lp, old, adv, mask, seq_adv=adv[:, 0].clone(), num_sequences=lp.shape[0]))


# ---------------------------------------------------------------------------------------------- dppo
@pytest.mark.parametrize("variant", [
    dict(),
    dict(clip_ratio_low=0.05, clip_ratio_high=0.1, clip_ratio_c=20.0),
    dict(clip_ratio_low=0.02, clip_ratio_high=0.3, clip_ratio_c=1.5),
], ids=["defaults", "tight-cap20", "asymmetric-cap1.5"])
@pytest.mark.parametrize("divergence", ["tv", "kl"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum-norm"])
def test_dppo(variant, divergence, agg):
    obj = pgzoo.get(f"dppo-{divergence}", aggregation=PGZOO_AGG.get(agg, agg),
                    eps_low=variant.get("clip_ratio_low", 0.2), eps_high=variant.get("clip_ratio_high", 0.2),
                    is_cap=variant.get("clip_ratio_c", 3.0))
    dropped = 0.0
    for seed, scale in zip(SEEDS, SCALES):
        lp, old, adv, mask = make_inputs(seed, scale=scale, per_token=seed == 2)
        z = pgzoo_grad(obj, lp, old, adv, mask)
        assert_same(verl_grad(f"dppo_{divergence}", lp, old, adv, mask, agg, **variant), z)
        dropped += float(z[2].metrics["clip/fraction"])
    assert dropped > 0


# ---------------------------------------------------------------------------------------------- gspo, cispo
@pytest.mark.parametrize("scale", [2e-4, 0.05, 0.5])
def test_gspo(scale):
    eps = dict(clip_ratio_low=3e-4, clip_ratio_high=4e-4)
    for seed in SEEDS:
        lp, old, adv, mask = make_inputs(seed, scale=scale, per_token=seed == 2)
        v = verl_grad("gspo", lp, old, adv, mask, "seq-mean-token-mean", **eps)
        assert_same(v, pgzoo_grad(pgzoo.get("gspo-token"), lp, old, adv, mask))
        if seed != 2:  # sequence advantages: gspo (one term per sequence) has the same gradient
            assert_same(v, pgzoo_grad(pgzoo.get("gspo"), lp, old, adv, mask, seq_adv=adv[:, 0].clone()))


@pytest.mark.parametrize("agg", AGG_MODES)
def test_cispo(agg):
    for seed, scale in zip(SEEDS, SCALES):
        lp, old, adv, mask = make_inputs(seed, scale=scale)
        # pgzoo's defaults (MiniMax-M1: no lower bound, cap 5) are verl's cispo with clip ratios 1 and 4
        v = verl_grad("cispo", lp, old, adv, mask, agg, clip_ratio_low=1.0, clip_ratio_high=4.0)
        assert_same(v, pgzoo_grad(pgzoo.get("cispo", aggregation=PGZOO_AGG.get(agg, agg)), lp, old, adv, mask))
        # verl's actor defaults (0.2, 0.2)
        v = verl_grad("cispo", lp, old, adv, mask, agg)
        obj = pgzoo.get("cispo", eps_low=0.2, eps_high=0.2, aggregation=PGZOO_AGG.get(agg, agg))
        assert_same(v, pgzoo_grad(obj, lp, old, adv, mask))


def test_every_verl_policy_loss_is_accounted_for():
    """The registry of verl 0.9.1 against docs/objectives.md's table: a new verl loss must get a row."""
    from pathlib import Path

    from pgzoo.adapters.verl.names import PREFIX

    doc = (Path(__file__).parents[1] / "docs" / "objectives.md").read_text()
    table = doc[doc.index("pgzoo name ↔ TRL `loss_type` ↔ verl `policy_loss`"):]
    for name in core_algos.POLICY_LOSS_REGISTRY:
        if name.startswith(PREFIX):  # pgzoo's own objectives, registered by its verl plugin (docs/verl.md)
            continue
        assert f"`{name}`" in table, name
