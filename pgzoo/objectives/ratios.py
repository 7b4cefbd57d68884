"""Importance ratios with gradient, shared by the objectives and the loss-shaping options.

Log-ratios entering an exponential *with gradient* are clamped to ±:data:`MAX_LOG_RATIO` (as verl does): r stays
within [2e-9, 4.9e8], so the loss and its gradient are finite in float32 however far the policies drift. Inside the
band (edges included) the gradient is exact; outside it, 0 — as ``clamp(...).exp()``, whose backward on CPU is a
``where`` over two comparisons that costs more than the rest of a PPO term's backward, so the ratio is one autograd
function with a one-pass backward (``hardtanh_backward``, its open band widened by one ulp to include the edges).
"""

from __future__ import annotations

import torch

from pgzoo.batch import TokenBatch

MAX_LOG_RATIO = 20.0


_OPEN_BAND: dict[torch.dtype, tuple[float, float]] = {}


def _open_band(dtype: torch.dtype) -> tuple[float, float]:
    """±MAX_LOG_RATIO moved one ulp outwards in ``dtype``: the open interval holds exactly [−MAX, MAX]."""
    if dtype not in _OPEN_BAND:
        edge = torch.tensor(MAX_LOG_RATIO, dtype=dtype)  # on the CPU: no device sync
        out = float(torch.nextafter(edge, torch.tensor(float("inf"), dtype=dtype)))
        _OPEN_BAND[dtype] = (-out, out)
    return _OPEN_BAND[dtype]


class _ClampedExp(torch.autograd.Function):
    """r = exp(clamp(x, ±MAX_LOG_RATIO)); ∂r/∂x = r inside the band (edges included), 0 outside."""

    @staticmethod
    def forward(ctx, log_r: torch.Tensor) -> torch.Tensor:
        r = log_r.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO).exp_()
        ctx.save_for_backward(log_r, r)
        return r

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        log_r, r = ctx.saved_tensors
        return torch.ops.aten.hardtanh_backward(grad * r, log_r, *_open_band(log_r.dtype))


class _WeightedRatio(torch.autograd.Function):
    """y = c·exp(clamp(lp − old, ±MAX_LOG_RATIO)), non-finite products zeroed, for a detached coefficient c that is 0
    at masked positions and finite elsewhere; ∂y/∂lp = y inside the band (edges included), 0 outside."""

    @staticmethod
    def forward(ctx, lp: torch.Tensor, old: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        log_r = torch.sub(lp, old)
        y = log_r.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO).exp_().mul_(coef).nan_to_num_(0.0, 0.0, 0.0)
        ctx.save_for_backward(log_r, y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        log_r, y = ctx.saved_tensors
        # garbage (NaN) in log r at a masked position passes hardtanh_backward's test, times y = 0 there
        return torch.ops.aten.hardtanh_backward(grad * y, log_r, *_open_band(log_r.dtype)), None, None


def weighted_ratio(batch: TokenBatch, coef: torch.Tensor) -> torch.Tensor:
    """``coef · r`` with r = exp(lp − old) (log clamped as in :func:`ratio`), exactly 0 at masked positions whatever
    the fields hold there, with gradient ``coef · r`` inside the band: an unclipped importance-weighted term in two
    passes forward and two backward, from the raw fields. ``coef``: ``[B, T]`` without gradient, exactly 0 at masked
    positions and finite elsewhere (:meth:`~pgzoo.TokenBatch.zero_masked_` makes one); it must not be modified
    afterwards. Equal to ``coef * ratio(masked_log_ratio(batch))`` up to the rounding of the gradient's product."""
    lp = batch.logprobs
    old = lp.detach() if batch.old_logprobs is None else batch.old_logprobs.detach().to(lp.dtype)
    if torch.compiler.is_compiling():
        return torch.where(batch.mask, coef * ratio(lp - old), 0.0)
    return _WeightedRatio.apply(lp, old, coef)


def ratio(log_r: torch.Tensor) -> torch.Tensor:
    """r = exp(log r) with log r clamped to ±MAX_LOG_RATIO (finite in float32; exact gradient inside the band)."""
    if torch.compiler.is_compiling() or not log_r.requires_grad:  # compiled, the clamp fuses into its consumers
        return log_r.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO).exp()
    return _ClampedExp.apply(log_r)


def importance_log_ratio(batch: TokenBatch, lp: torch.Tensor, level: str) -> torch.Tensor:
    """log r ``[B, T]`` with gradient, zero at masked positions: ``token`` lp − old; ``sequence`` the row mean
    Σ_t m(lp − old)/|y_i| broadcast over the row's tokens (GSPO's sequence ratio, TRL's ``importance_sampling_level``).
    ``lp`` must already be masked (zero at masked positions)."""
    log_r = lp - batch.clean("old_logprobs")
    if level == "token":
        return log_r
    log_s = log_r.sum(-1, keepdim=True) / batch.seq_lengths().clamp_min(1.0)[:, None]
    return log_s * batch.mask_float()


def detached_log_ratio(batch: TokenBatch, field: str = "old_logprobs") -> torch.Tensor:
    """sg(lp) − ``field`` ``[B, T]``, a fresh tensor without gradient that the caller may modify in place, with
    whatever the inputs hold at masked positions (garbage, NaN): for a coefficient built from it in place and
    sanitised once at the end (:meth:`~pgzoo.TokenBatch.zero_masked_`), instead of masking each input field.
    ``old_logprobs`` None (on-policy): all zeros."""
    lp = batch.logprobs.detach()
    other = getattr(batch, field)
    if other is None:
        return torch.zeros_like(lp)
    return torch.sub(lp, other.to(lp.dtype))


def masked_log_ratio(batch: TokenBatch) -> torch.Tensor:
    """lp − old ``[B, T]`` with gradient, exactly 0 at masked positions (gradient 0 there too): one NaN-safe masking
    of the difference instead of one of each field. Equal to ``importance_log_ratio(batch, batch.masked(lp),
    "token")``."""
    lp = batch.logprobs
    old = batch.old_logprobs
    return batch.masked(lp - (lp.detach() if old is None else old.detach().to(lp.dtype)))
