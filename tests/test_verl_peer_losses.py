"""verl 0.9.1's ``dro`` policy loss and its ``kl_penalty`` values ``abs``, ``k1+``, ``k3+``, ``low_var_kl+`` against
pgzoo's ``dro`` and KL options, on the same float64 tensors: loss and ∂loss/∂log_prob at every unmasked token.

The helpers are those of tests/test_verl_losses.py (verl reads every position, so its masked positions hold zeros;
pgzoo's hold NaN). Without verl 0.9.1 this module is skipped, saying why.
"""

from __future__ import annotations

import pytest
import torch
from test_verl_losses import AGG_MODES, PGZOO_AGG, SCALES, SEEDS, assert_same, make_inputs, pgzoo_grad, verl_grad

import pgzoo

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("tau", [0.1, 2.0])
def test_dro(agg, tau):
    for seed, scale in zip(SEEDS, SCALES):
        lp, old, adv, mask = make_inputs(seed, scale=scale, per_token=seed == 2)
        v = verl_grad("dro", lp, old, adv, mask, agg, policy_loss={"dro_beta": tau})
        for name in ("dro", "kimi15"):
            obj = pgzoo.get(name, tau=tau, aggregation=PGZOO_AGG.get(agg, agg))
            assert_same(v, pgzoo_grad(obj, lp, old, adv, mask))


def test_dro_global_normalisers():
    lp, old, adv, mask = make_inputs(1, scale=0.5)
    info = dict(dp_size=1, batch_num_tokens=37, global_batch_size=11, loss_scale_factor=20)
    v = verl_grad("dro", lp, old, adv, mask, "token-mean", policy_loss={"dro_beta": 0.1}, global_batch_info=info)
    assert_same(v, pgzoo_grad(pgzoo.get("dro"), lp, old, adv, mask, num_tokens=37, num_sequences=11, max_tokens=20))


# verl's kl_penalty name -> pgzoo's ``kl`` value. verl's "k3" is clamped at 10 like its "low_var_kl", so verl's
# "k3+" is pgzoo's "low-var-k3+"; pgzoo's "k3+" equals it wherever k3 stays below 10 (checked on the first case).
KL_NAMES = {"abs": "abs", "k1+": "k1+", "k3+": "low-var-k3+", "low_var_kl+": "low-var-k3+", "k1": "k1",
            "low_var_kl": "low-var-k3"}


@pytest.mark.parametrize("verl_name", sorted(KL_NAMES))
@pytest.mark.parametrize("spread", [0.5, 6.0])  # 6: estimates far above verl's clamp at 10
def test_kl_estimators(verl_name, spread):
    lp, _, _, mask = make_inputs(3, scale=0.1)
    g = torch.Generator().manual_seed(11)
    ref = lp + spread * torch.randn(lp.shape, generator=g, dtype=torch.float64)
    x = torch.where(mask, lp, 0.0).requires_grad_(True)
    verl_loss = (core_algos.kl_penalty(x, torch.where(mask, ref, 0.0), verl_name) * mask).sum()
    (verl_g,) = torch.autograd.grad(verl_loss, x)
    zero = torch.zeros(lp.shape[0], dtype=torch.float64)
    obj = pgzoo.get("gpg", beta=1.0, kl=KL_NAMES[verl_name], aggregation="token-sum")
    loss, grad, _ = pgzoo_grad(obj, lp, lp, zero[:, None].expand_as(lp), mask, seq_adv=zero,
                               ref_logprobs=torch.where(mask, ref, float("nan")))
    torch.testing.assert_close(loss, verl_loss.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, torch.where(mask, verl_g, 0.0), rtol=1e-10, atol=1e-12)
    assert verl_g.abs().sum() > 0
    if verl_name == "k3+" and spread == 0.5:  # below the clamp pgzoo's unclamped k3+ is the same loss
        loss_k3, grad_k3, _ = pgzoo_grad(pgzoo.get("gpg", beta=1.0, kl="k3+", aggregation="token-sum"), lp, lp,
                                         zero[:, None].expand_as(lp), mask, seq_adv=zero,
                                         ref_logprobs=torch.where(mask, ref, float("nan")))
        torch.testing.assert_close(loss_k3, verl_loss.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grad_k3, grad, rtol=1e-12, atol=1e-14)
