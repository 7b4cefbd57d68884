"""Diagnostics every objective reports (DESIGN §5), as masked, detached tensors — no host sync.

Notation as in :mod:`pgzoo.objectives`: lp = log π_θ, old = log π_θold, mu = log μ_θold (inference engine),
m = mask. The log-ratio of the current policy to the sampler splits into two factors (MiniRL, eq. 5):

    log π_θ/μ_θold = (old − mu)  +  (lp − old)
                     training–inference   staleness

First-order gap. MiniRL's token-level objective is the first-order expansion of the sequence-level one: with
per-token weights w_t = 1 + δ_t, the sequence weight Π_t w_t equals 1 + Σ_t (w_t − 1) + O(δ²). The metric
``first_order/gap_<factor>`` is the mean over sequences of |Π_t w_t − (1 + Σ_t (w_t − 1))| for the factor's
w_t (train_inference: exp(old − mu); staleness: exp(lp − old); total: exp(lp − mu)). It grows like δ²·|y|² and tells
a user the token-level surrogate has stopped approximating the sequence objective, before the run collapses.
The product is formed in log space and per-sequence values are combined in float64 with clamped exponents, so the
metric is finite whatever the log-ratios are.

Every name is documented in docs/metrics.md. All statistics are local to the batch passed in (over its unmasked
tokens, or over its sequences with at least one token); trainers average them over micro-batches when they log.
"""

from __future__ import annotations

import torch

from pgzoo.batch import TokenBatch

# Clamp for exponentials of log-ratios inside *metrics* only (exp(50) ≈ 5e21: finite sums in float32).
_METRIC_MAX_LOG = 50.0
# Clamp for the per-sequence log-product: exp(80) ≈ 5.5e34 stays finite when the metric is cast to float32.
_SEQ_MAX_LOG = 80.0


# ---------------------------------------------------------------------------------------------- masked reductions
def _count(where: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return where.sum().to(like.dtype).clamp_min(1.0)


def masked_mean(x: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over positions where ``where`` is true (0 when none); NaN at other positions is ignored."""
    x = x.detach()
    return torch.where(where, x, torch.zeros_like(x)).sum() / _count(where, x)


def masked_max(x: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Max of ``x`` where ``where`` is true (0 when none)."""
    x = x.detach()
    out = torch.where(where, x, torch.full_like(x, -torch.inf)).amax()
    return torch.where(where.any(), out, torch.zeros_like(out))


def masked_min(x: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Min of ``x`` where ``where`` is true (0 when none)."""
    x = x.detach()
    out = torch.where(where, x, torch.full_like(x, torch.inf)).amin()
    return torch.where(where.any(), out, torch.zeros_like(out))


def masked_fraction(flags: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Fraction of positions where ``where`` holds at which ``flags`` is also true."""
    dtype = torch.float32
    return (flags & where).sum().to(dtype) / where.sum().to(dtype).clamp_min(1.0)


# ---------------------------------------------------------------------------------------------- first-order gap
def first_order_gap(log_w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence |Π_t w_t − (1 + Σ_t (w_t − 1))| for token log-weights ``log_w`` ``[B, T]`` (float64 ``[B]``).

    Masked positions count as w_t = 1 (they contribute nothing to either side). Finite for any finite input.

    Example:
        >>> first_order_gap(torch.log(torch.tensor([[1.1, 1.1]])), torch.ones(1, 2, dtype=torch.bool))
        tensor([0.0100], dtype=torch.float64)
    """
    lw = torch.where(mask, log_w.detach(), torch.zeros_like(log_w)).clamp(-_METRIC_MAX_LOG, _METRIC_MAX_LOG)
    log_prod = lw.sum(-1).double().clamp(-_SEQ_MAX_LOG, _SEQ_MAX_LOG)
    first_order = 1.0 + torch.expm1(lw).sum(-1).double()
    return (torch.exp(log_prod) - first_order).abs()


# ---------------------------------------------------------------------------------------------- shared metrics
def policy_metrics(batch: TokenBatch, log_ratio: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The objective-independent metrics of DESIGN §5 for ``batch``.

    Args:
        batch: the TokenBatch.
        log_ratio: optional precomputed ``lp − old`` ``[B, T]`` (any values at masked positions); recomputed if None.

    Returns (detached scalar tensors):
        ``ratio/mean``, ``ratio/min``, ``ratio/max`` of r = exp(lp − old) over unmasked tokens;
        ``log_ratio/staleness_mean``, ``log_ratio/staleness_abs_mean`` of (lp − old);
        ``first_order/gap_staleness``;
        and when ``rollout_logprobs`` is given: ``kl/train_inference_k1`` = mean(mu − old),
        ``log_ratio/train_inference_mean``, ``log_ratio/train_inference_abs_mean`` of (old − mu),
        ``first_order/gap_train_inference`` and ``first_order/gap_total``.
    """
    mask = batch.mask
    if log_ratio is None:
        log_ratio = batch.logprobs.detach() - batch.clean("old_logprobs")
    stale = torch.where(mask, log_ratio.detach(), torch.zeros_like(log_ratio))
    if stale.dtype in (torch.float16, torch.bfloat16):  # statistics in float32 for 16-bit inputs
        stale = stale.float()
    n = _count(mask, stale)
    s_min, s_max = masked_min(stale, mask), masked_max(stale, mask)
    ratio = stale.clamp(-_METRIC_MAX_LOG, _METRIC_MAX_LOG).exp()
    metrics = {
        # ratio at masked positions is exp(0) = 1: subtract their count instead of a second where().
        "ratio/mean": (ratio.sum() - (~mask).sum().to(ratio.dtype)) / n,
        "ratio/min": s_min.clamp(-_METRIC_MAX_LOG, _METRIC_MAX_LOG).exp(),
        "ratio/max": s_max.clamp(-_METRIC_MAX_LOG, _METRIC_MAX_LOG).exp(),
        "log_ratio/staleness_mean": stale.sum() / n,
        "log_ratio/staleness_abs_mean": stale.abs().sum() / n,
    }
    gap_stale = first_order_gap(stale, mask)
    has_tokens = mask.any(-1)
    n_seq = has_tokens.sum().double().clamp_min(1.0)
    out_dtype = stale.dtype
    metrics["first_order/gap_staleness"] = (gap_stale.sum() / n_seq).to(out_dtype)
    if batch.rollout_logprobs is not None:
        ti = batch.clean("old_logprobs") - batch.clean("rollout_logprobs")  # old − mu, 0 at masked positions
        ti = ti.to(stale.dtype)
        metrics["kl/train_inference_k1"] = -ti.sum() / n
        metrics["log_ratio/train_inference_mean"] = ti.sum() / n
        metrics["log_ratio/train_inference_abs_mean"] = ti.abs().sum() / n
        metrics["first_order/gap_train_inference"] = (first_order_gap(ti, mask).sum() / n_seq).to(out_dtype)
        metrics["first_order/gap_total"] = (first_order_gap(ti + stale, mask).sum() / n_seq).to(out_dtype)
    return metrics


def clip_metrics(low: torch.Tensor, high: torch.Tensor, where: torch.Tensor) -> dict[str, torch.Tensor]:
    """``clip/low_fraction``, ``clip/high_fraction`` and ``clip/fraction`` of the positions in ``where``."""
    return {
        "clip/low_fraction": masked_fraction(low, where),
        "clip/high_fraction": masked_fraction(high, where),
        "clip/fraction": masked_fraction(low | high, where),
    }


def weight_metrics(weight: torch.Tensor, truncated: torch.Tensor, where: torch.Tensor) -> dict[str, torch.Tensor]:
    """``is/weight_mean``, ``is/weight_max`` and ``is/truncated_fraction`` of an objective's IS weight."""
    return {
        "is/weight_mean": masked_mean(weight, where),
        "is/weight_max": masked_max(weight, where),
        "is/truncated_fraction": masked_fraction(truncated, where),
    }


def entropy_metrics(entropy: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """``entropy/mean`` and ``entropy/max`` of per-token policy entropies ``[B, T]`` over unmasked tokens.

    Objectives do not see entropies; trainers that compute them (``pgzoo.logprobs``) log these next to
    ``out.metrics``.
    """
    mask = mask.to(torch.bool)
    return {"entropy/mean": masked_mean(entropy, mask), "entropy/max": masked_max(entropy, mask)}
