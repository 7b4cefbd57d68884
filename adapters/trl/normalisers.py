"""The global normalisers of one optimizer step, as both TRL adapters pass them to every micro-batch.

An optimizer step sums the gradients of its gradient-accumulation micro-batches on each process, and data
parallelism averages over the W processes: the step's gradient is (1/W) Σ_w Σ_mb ∇loss_{w,mb}. Every pgzoo
aggregation is (Σ of per-row terms) / D with D one of N_seq, N_tok or N_seq·L of the *whole* step (every
micro-batch on every process). Passing D/W as each micro-batch's normaliser makes that sum ∇(Σ_all / D): the
objective's gradient on the step's full batch, however the trainer splits rows and tokens. The trainers differ only
in when the step's rows are known: ``GRPOTrainer`` buffers a whole rollout, ``AsyncGRPOTrainer`` fetches the
step's micro-batches before the first forward (transformers' ``get_batch_samples``).
"""

from __future__ import annotations

import torch


def mask_counts(mask: torch.Tensor) -> torch.Tensor:
    """``[2]`` long: the rows of ``mask`` (``[B, T]``) with at least one counted token, and the counted tokens.

    These are the counts :class:`pgzoo.TokenBatch` uses by default, so a fully masked row adds to neither."""
    m = mask.bool()
    return torch.stack([m.any(-1).sum(), m.sum()]).long()


def per_process(num_sequences: float, num_tokens: float, num_processes: int) -> tuple[float, float]:
    """``(N_seq / W, N_tok / W)`` for a step whose global counts are ``num_sequences`` and ``num_tokens`` (each at
    least 1, so a step without tokens gives a zero loss rather than a division by zero)."""
    return max(float(num_sequences), 1.0) / num_processes, max(float(num_tokens), 1.0) / num_processes


__all__ = ["mask_counts", "per_process"]
