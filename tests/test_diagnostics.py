"""Diagnostics (docs/design.md §5): each metric against a direct computation, and stability. (No host sync, documented names
and float32 statistics of 16-bit inputs, per objective: tests/test_objective_properties.py.)"""

from __future__ import annotations

import math

import pytest
import torch
from _objective_checks import documented_metric_names

import pgzoo
from pgzoo.objectives.diagnostics import (
    entropy_metrics,
    first_order_gap,
    masked_max,
    masked_mean,
    masked_min,
)
from pgzoo.testing import random_batch


def test_shared_metrics_by_hand():
    batch = random_batch(6, 9, seed=11, scale=0.4, pad_value=float("nan"), fully_masked_row=True)
    batch = batch.replace(advantages=batch.advantages * torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0]))  # A = 0 rows
    out = pgzoo.get("dapo")(batch)
    m = batch.mask
    lp, old, mu = batch.logprobs.detach()[m], batch.old_logprobs[m], batch.rollout_logprobs[m]
    r = torch.exp(lp - old)
    expected = {
        "ratio/mean": r.mean(), "ratio/min": r.min(), "ratio/max": r.max(),
        "kl/train_inference_k1": (mu - old).mean(),
        "log_ratio/train_inference_mean": (old - mu).mean(),
        "log_ratio/train_inference_abs_mean": (old - mu).abs().mean(),
        "log_ratio/staleness_mean": (lp - old).mean(),
        "log_ratio/staleness_abs_mean": (lp - old).abs().mean(),
    }
    adv = batch.advantages[:, None].expand_as(m)[m]
    low = ((adv < 0) & (r < 0.8)).double().mean()
    high = ((adv > 0) & (r > 1.28)).double().mean()
    expected.update({"clip/low_fraction": low, "clip/high_fraction": high, "clip/fraction": low + high})
    for key, value in expected.items():
        torch.testing.assert_close(out.metrics[key].double(), value.double(), rtol=1e-6, atol=1e-9, msg=key)
    assert 0 < float(high) and 0 < float(low)

    # first-order gaps, sequence by sequence, over rows that have tokens
    def gap(log_w):
        gaps = []
        for i in range(m.shape[0]):
            if not m[i].any():
                continue
            lw = log_w[i][m[i]]
            gaps.append(abs(math.exp(float(lw.sum())) - (1 + float((lw.exp() - 1).sum()))))
        return sum(gaps) / len(gaps)

    full_lp, full_old, full_mu = batch.logprobs.detach(), batch.old_logprobs, batch.rollout_logprobs
    for key, log_w in {
        "first_order/gap_staleness": full_lp - full_old,
        "first_order/gap_train_inference": full_old - full_mu,
        "first_order/gap_total": full_lp - full_mu,
    }.items():
        assert float(out.metrics[key]) == pytest.approx(gap(log_w), rel=1e-9), key


def test_minirl_weight_metrics_by_hand():
    batch = random_batch(6, 9, seed=12, scale=1.2)
    out = pgzoo.get("minirl")(batch)
    m = batch.mask
    raw = torch.exp(batch.logprobs.detach() - batch.rollout_logprobs)[m]
    w = raw.clamp(max=5.0)
    torch.testing.assert_close(out.metrics["is/weight_mean"], w.mean())
    torch.testing.assert_close(out.metrics["is/weight_max"], w.max())
    torch.testing.assert_close(out.metrics["is/truncated_fraction"], (raw > 5).float().mean())
    assert 0 < float(out.metrics["is/truncated_fraction"]) < 1


def test_cispo_weight_metrics_and_gspo_sequence_clip():
    batch = random_batch(6, 9, seed=13, scale=2.0)
    out = pgzoo.get("cispo")(batch)
    r = torch.exp(batch.logprobs.detach() - batch.old_logprobs)[batch.mask]
    torch.testing.assert_close(out.metrics["is/weight_mean"], r.clamp(max=5).mean())
    torch.testing.assert_close(out.metrics["clip/high_fraction"], (r > 5).float().mean())
    assert float(out.metrics["clip/low_fraction"]) == 0.0  # no lower bound by default

    batch = random_batch(40, 5, seed=14, scale=4e-4)
    out = pgzoo.get("gspo")(batch)
    m = batch.mask
    s = torch.exp(((batch.logprobs.detach() - batch.old_logprobs) * m).sum(-1) / m.sum(-1))
    a = batch.advantages
    high = ((a > 0) & (s > 1 + 4e-4)).double().mean()
    low = ((a < 0) & (s < 1 - 3e-4)).double().mean()
    torch.testing.assert_close(out.metrics["clip/high_fraction"].double(), high)
    torch.testing.assert_close(out.metrics["clip/low_fraction"].double(), low)
    torch.testing.assert_close(out.metrics["gspo/seq_ratio_mean"], s.mean())


def test_first_order_gap_function():
    m = torch.ones(1, 2, dtype=torch.bool)
    # w = (1.1, 1.1): product 1.21, expansion 1.2
    assert float(first_order_gap(torch.log(torch.tensor([[1.1, 1.1]], dtype=torch.float64)), m)) == \
        pytest.approx(0.01, rel=1e-12)
    # one token: the expansion is exact
    one = torch.ones(1, 1, dtype=torch.bool)
    assert float(first_order_gap(torch.tensor([[0.7]], dtype=torch.float64), one)) == pytest.approx(0.0, abs=1e-15)
    assert float(first_order_gap(torch.tensor([[0.7]]), one)) == pytest.approx(0.0, abs=1e-6)  # float32 rounding
    # huge and NaN-at-masked inputs stay finite
    huge = torch.tensor([[1e4, -1e4, float("nan")]])
    assert torch.isfinite(first_order_gap(huge, torch.tensor([[True, True, False]]))).all()
    assert torch.isfinite(first_order_gap(torch.full((2, 4096), 80.0), torch.ones(2, 4096, dtype=torch.bool))).all()


def test_masked_reductions_handle_empty_and_nan():
    x = torch.tensor([[1.0, float("nan")], [3.0, -2.0]])
    where = torch.tensor([[True, False], [True, True]])
    assert float(masked_mean(x, where)) == pytest.approx(2 / 3)
    assert float(masked_max(x, where)) == 3.0 and float(masked_min(x, where)) == -2.0
    nothing = torch.zeros_like(where)
    assert float(masked_mean(x, nothing)) == 0.0 and float(masked_max(x, nothing)) == 0.0
    ent = entropy_metrics(torch.tensor([[0.5, 9.0]]), torch.tensor([[1, 0]]))
    assert float(ent["entropy/mean"]) == 0.5 and float(ent["entropy/max"]) == 0.5


def test_train_inference_metrics_need_rollout_logprobs():
    batch = random_batch(3, 4, seed=0, rollout=False)
    metrics = pgzoo.get("grpo")(batch).metrics
    assert "kl/train_inference_k1" not in metrics and "first_order/gap_staleness" in metrics


# Per objective and option set, no host sync, documented metric names and float32 metrics of 16-bit inputs are
# checked in tests/test_objective_properties.py; the helpers' own names here.
def test_entropy_metric_names_are_documented():
    assert set(entropy_metrics(torch.zeros(1, 1), torch.ones(1, 1))) <= documented_metric_names()
