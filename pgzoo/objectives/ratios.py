"""Importance ratios with gradient, shared by the objectives and the loss-shaping options.

Log-ratios entering an exponential *with gradient* are clamped to ±:data:`MAX_LOG_RATIO` (as verl does): r stays
within [2e-9, 4.9e8], so the loss and its gradient are finite in float32 however far the policies drift. Inside the
band the gradient is exact.
"""

from __future__ import annotations

import torch

from pgzoo.batch import TokenBatch

MAX_LOG_RATIO = 20.0


def ratio(log_r: torch.Tensor) -> torch.Tensor:
    """r = exp(log r) with log r clamped to ±MAX_LOG_RATIO (finite in float32; exact gradient inside the band)."""
    return log_r.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO).exp()


def importance_log_ratio(batch: TokenBatch, lp: torch.Tensor, level: str) -> torch.Tensor:
    """log r ``[B, T]`` with gradient, zero at masked positions: ``token`` lp − old; ``sequence`` the row mean
    Σ_t m(lp − old)/|y_i| broadcast over the row's tokens (GSPO's sequence ratio, TRL's ``importance_sampling_level``).
    ``lp`` must already be masked (zero at masked positions)."""
    log_r = lp - batch.clean("old_logprobs")
    if level == "token":
        return log_r
    log_s = log_r.sum(-1, keepdim=True) / batch.seq_lengths().clamp_min(1.0)[:, None]
    return log_s * batch.mask_float()
