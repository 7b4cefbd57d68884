"""Diagnostics every objective reports (docs/design.md §5), as masked, detached tensors — no host sync.

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

# Clamp for exponentials of log-ratios inside *metrics* only (exp(40) ≈ 2e17: a product of two stays finite).
_METRIC_MAX_LOG = 40.0
# Clamp for the per-sequence log-product: exp(80) ≈ 5.5e34 stays finite when the metric is cast to float32.
_SEQ_MAX_LOG = 80.0


# ---------------------------------------------------------------------------------------------- masked reductions
def _count(where: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return torch.count_nonzero(where).to(like.dtype).clamp_min(1.0)


def _detach(x: torch.Tensor) -> torch.Tensor:
    """Detached, and in float32 if 16-bit (statistics are accumulated in at least float32)."""
    x = x.detach()
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def masked_mean(x: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over positions where ``where`` is true (0 when none); NaN at other positions is ignored."""
    x = _detach(x)
    return torch.where(where, x, 0.0).sum() / _count(where, x)


def masked_max(x: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Max of ``x`` where ``where`` is true (0 when none)."""
    x = _detach(x)
    out = torch.where(where, x, -torch.inf).amax()
    return torch.where(where.any(), out, 0.0)


def masked_min(x: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Min of ``x`` where ``where`` is true (0 when none)."""
    x = _detach(x)
    out = torch.where(where, x, torch.inf).amin()
    return torch.where(where.any(), out, 0.0)


def masked_fraction(flags: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Fraction of positions where ``where`` holds at which ``flags`` is also true."""
    return torch.count_nonzero(flags & where).float() / torch.count_nonzero(where).float().clamp_min(1.0)


def _fraction(flags: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """count_nonzero(flags) / count, for flags already false at masked positions."""
    return torch.count_nonzero(flags).to(count.dtype) / count


# ---------------------------------------------------------------------------------------------- first-order gap
def first_order_gap(log_w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence |Π_t w_t − (1 + Σ_t (w_t − 1))| for token log-weights ``log_w`` ``[B, T]`` (float64 ``[B]``).

    Masked positions count as w_t = 1 (they contribute nothing to either side). Finite for any finite input.

    Example:
        >>> first_order_gap(torch.log(torch.tensor([[1.1, 1.1]])), torch.ones(1, 2, dtype=torch.bool))
        tensor([0.0100], dtype=torch.float64)
    """
    lw = torch.where(mask, log_w.detach(), 0.0)
    return _gap_from_rows(lw.sum(-1), torch.expm1(lw.clamp(max=_METRIC_MAX_LOG)).sum(-1))


def _gap_from_rows(row_log: torch.Tensor, row_expm1: torch.Tensor) -> torch.Tensor:
    """|exp(Σ log w) − 1 − Σ (w − 1)| per row, in float64 with the log-product clamped; 0 for empty rows."""
    prod_minus_one = torch.expm1(row_log.double().clamp(-_SEQ_MAX_LOG, _SEQ_MAX_LOG))
    return (prod_minus_one - row_expm1.double()).abs().clamp(max=1e300)


# ---------------------------------------------------------------------------------------------- shared metrics
def policy_metrics(
    batch: TokenBatch,
    log_ratio: torch.Tensor | None = None,
    *,
    staleness_expm1: torch.Tensor | None = None,
    total_log: torch.Tensor | None = None,
    total_expm1: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The objective-independent metrics of docs/design.md §5 for ``batch``.

    Args:
        batch: the TokenBatch.
        log_ratio: optional precomputed ``lp − old`` ``[B, T]``, **zero at masked positions**; recomputed if None.
        staleness_expm1, total_log, total_expm1: optional precomputed ``expm1(lp − old)``, ``lp − mu`` and
            ``expm1(lp − mu)`` (log-ratios clamped above at 40 before expm1, zero at masked positions), so that an
            objective that already has them does not pay for them twice.

    Returns (detached scalar tensors):
        ``ratio/mean``, ``ratio/min``, ``ratio/max`` of r = exp(lp − old) over unmasked tokens;
        ``log_ratio/staleness_mean``, ``log_ratio/staleness_abs_mean`` of (lp − old);
        ``first_order/gap_staleness``;
        and when ``rollout_logprobs`` is given: ``kl/train_inference_k1`` = mean(mu − old),
        ``log_ratio/train_inference_mean``, ``log_ratio/train_inference_abs_mean`` of (old − mu),
        ``first_order/gap_train_inference`` and ``first_order/gap_total``.

    Cost: a few passes over ``[B, T]`` per factor (one expm1, row sums), no ``where``, no host sync. Every value at
    a masked position is 0 by construction, so sums need no mask.
    """
    if log_ratio is None:
        log_ratio = batch.masked(batch.logprobs.detach()) - batch.clean("old_logprobs")
    stale = log_ratio.detach()
    out_dtype = torch.float64 if stale.dtype == torch.float64 else torch.float32  # 16-bit inputs: float32 stats
    stale = stale.to(out_dtype)
    n = batch.local_token_count().to(out_dtype).clamp_min(1.0)
    n_seq = batch.has_tokens().sum().double().clamp_min(1.0)

    def expm1(x):
        return x.clamp(max=_METRIC_MAX_LOG).expm1_()  # expm1 ≥ −1 below, so only the top needs a clamp

    row_s = stale.sum(-1)
    e_s = expm1(stale) if staleness_expm1 is None else staleness_expm1.detach().to(out_dtype)
    row_e = e_s.sum(-1)
    s_min, s_max = _masked_minmax(stale, batch)
    metrics = {
        "ratio/mean": _finite(1.0 + row_e.double().sum() / n, out_dtype),  # r − 1 = expm1(log r), 0 when masked
        "ratio/min": s_min.clamp(-_METRIC_MAX_LOG, _METRIC_MAX_LOG).exp(),
        "ratio/max": s_max.clamp(-_METRIC_MAX_LOG, _METRIC_MAX_LOG).exp(),
        "log_ratio/staleness_mean": row_s.sum() / n,
        "log_ratio/staleness_abs_mean": torch.linalg.vector_norm(stale, ord=1) / n,
        "first_order/gap_staleness": _finite(_gap_from_rows(row_s, row_e).sum() / n_seq, out_dtype),
    }
    if batch.rollout_logprobs is not None:
        ti = (batch.clean("old_logprobs") - batch.clean("rollout_logprobs")).to(out_dtype)  # old − mu
        row_ti = ti.sum(-1)
        metrics["kl/train_inference_k1"] = -row_ti.sum() / n
        metrics["log_ratio/train_inference_mean"] = row_ti.sum() / n
        metrics["log_ratio/train_inference_abs_mean"] = torch.linalg.vector_norm(ti, ord=1) / n
        e_ti = expm1(ti)
        row_e_ti = e_ti.sum(-1)
        metrics["first_order/gap_train_inference"] = _finite(_gap_from_rows(row_ti, row_e_ti).sum() / n_seq, out_dtype)
        if total_expm1 is not None:
            row_e_tot = total_expm1.detach().to(out_dtype).sum(-1)
        elif total_log is not None:
            row_e_tot = expm1(total_log.detach().to(out_dtype)).sum(-1)
        else:
            # w_total − 1 = (1 + e_s)(1 + e_ti) − 1 = e_s + e_ti + e_s·e_ti; the last sum as a row-wise dot product
            # (no [B, T] temporary). Each factor is ≤ e^40, so products stay finite; an overflowing row sum is +inf
            # (never NaN: every term is ≥ −1) and saturates below.
            if torch.compiler.is_compiling():  # fused into the surrounding loop
                cross = (e_s * e_ti).sum(-1)
            else:
                cross = torch.einsum("bt,bt->b", e_s, e_ti)
            row_e_tot = row_e + row_e_ti + cross
        gap_total = _gap_from_rows(row_s + row_ti, row_e_tot)
        metrics["first_order/gap_total"] = _finite(gap_total.sum() / n_seq, out_dtype)
    return metrics


def _masked_minmax(x: torch.Tensor, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of ``x`` (0 at masked positions) over the unmasked positions of ``batch``."""
    if torch.compiler.is_compiling():  # ±inf selects fuse into the single pass over the batch
        lo, hi = torch.where(batch.mask, x, torch.inf).amin(), torch.where(batch.mask, x, -torch.inf).amax()
        any_token = batch.mask.any()
        return torch.where(any_token, lo, 0.0), torch.where(any_token, hi, 0.0)
    # eager: masked positions take the value of one unmasked token (no slow where, one aminmax); tensor indices only
    fill = x.reshape(-1).index_select(0, batch.first_token_index().reshape(1))
    filled = torch.addcmul(x, batch.mask_float().to(x.dtype), fill, value=-1.0).add_(fill)  # x + (1 − m)·fill
    return torch.aminmax(filled)


def _finite(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast to ``dtype``, saturating at its largest finite value instead of overflowing to inf."""
    big = torch.finfo(dtype).max
    return x.clamp(-big, big).to(dtype)


def clip_metrics(low: torch.Tensor, high: torch.Tensor, where: torch.Tensor) -> dict[str, torch.Tensor]:
    """``clip/low_fraction``, ``clip/high_fraction`` and ``clip/fraction`` of the positions in ``where``.

    ``low`` and ``high`` must be disjoint and false wherever ``where`` is false (as clip flags computed from
    masked-zero advantages are).
    """
    count = torch.count_nonzero(where).float().clamp_min(1.0)
    low_f, high_f = _fraction(low, count), _fraction(high, count)
    return {"clip/low_fraction": low_f, "clip/high_fraction": high_f, "clip/fraction": low_f + high_f}


def weight_metrics(
    weight: torch.Tensor, truncated: torch.Tensor, where: torch.Tensor, where_float: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """``is/weight_mean``, ``is/weight_max`` and ``is/truncated_fraction`` of an objective's IS weight (≥ 0).

    ``where`` (bool) selects the positions; ``where_float`` is the same as 0/1 floats if the caller has it.
    """
    where_float = where.to(weight.dtype) if where_float is None else where_float
    w = _detach(weight) * where_float  # finite weights >= 0: a 0 fill never raises the max
    count = torch.count_nonzero(where).to(w.dtype).clamp_min(1.0)
    return {
        "is/weight_mean": w.sum() / count,
        "is/weight_max": w.amax(),
        "is/truncated_fraction": masked_fraction(truncated, where),
    }


def entropy_metrics(entropy: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """``entropy/mean`` and ``entropy/max`` of per-token policy entropies ``[B, T]`` over unmasked tokens.

    Objectives do not see entropies; trainers that compute them (``pgzoo.models.logprobs``) log these next to
    ``out.metrics``.
    """
    mask = mask.to(torch.bool)
    return {"entropy/mean": masked_mean(entropy, mask), "entropy/max": masked_max(entropy, mask)}
