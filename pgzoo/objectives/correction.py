"""Training–inference importance correction for the non-MiniRL objectives.

The tokens were sampled by the inference engine (μ_θold, e.g. vLLM) but the objective's ratio uses the training
engine's π_θold. The gap between the two is the *training–inference discrepancy*. A correction multiplies the
objective's term by a stop-gradient weight built from ρ_t = sg(old_t − mu_t) = log π_θold(y_t)/μ_θold(y_t):

==============  =============================================  =====================================
level           log-weight                                      shape
==============  =============================================  =====================================
``token``       ℓ_it = ρ_it                                     ``[B, T]``
``sequence``    ℓ_i  = Σ_t m_it ρ_it  (the product Π_t, in log space) ``[B]``, broadcast over tokens
``geometric``   ℓ_i  = Σ_t m_it ρ_it / |y_i|  (geometric mean)  ``[B]``, broadcast over tokens
==============  =============================================  =====================================

and then, with w = exp(ℓ),

- ``mode="truncate"`` (TIS, truncated importance sampling): w ← min(w, cap);
- ``mode="mask"`` (MIS / IcePop): w ← w · 1[low ≤ w ≤ high]  (tokens or sequences outside the band get weight 0).

Everything is computed in log space (clamped before the exponential), so huge discrepancies give finite weights.
The correction is off by default in every objective (faithful to the original papers); the MiniRL family carries
its own train–inference IS weight and takes no correction.

References: Yao et al., "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training" (2025, TIS / MIS);
the IcePop masking of the Ring-1T report (inclusionAI, 2025); MiniRL (arXiv 2512.01374) §3 for the discrepancy itself.

Example:
    >>> obj = pgzoo.get("grpo", correction={"level": "token", "mode": "truncate", "cap": 2.0})
    >>> obj = pgzoo.get("dapo", correction=pgzoo.objectives.correction.Correction(level="sequence", mode="mask", high=3.0))
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from pgzoo.batch import TokenBatch
from pgzoo.errors import ConfigError

LEVELS = ("token", "sequence", "geometric")
MODES = ("truncate", "mask")
# exp(80) ≈ 5.5e34: large enough to be "huge", small enough that sums over a batch stay finite in float32.
_MAX_LOG_WEIGHT = 80.0


@dataclass(frozen=True)
class Correction:
    """A training–inference correction setting (see the module docstring for the formulas).

    Args:
        level: ``"token"``, ``"sequence"`` (product of token ratios) or ``"geometric"`` (their geometric mean).
        mode: ``"truncate"`` (TIS: min(w, cap)) or ``"mask"`` (MIS / IcePop: w outside [low, high] → 0).
        cap: truncation threshold C > 0 for ``mode="truncate"`` (TIS uses 2).
        low: lower edge of the kept band for ``mode="mask"`` (≥ 0; IcePop uses 0.5).
        high: upper edge of the kept band for ``mode="mask"`` (> low; IcePop uses 5).
    """

    level: str = "token"
    mode: str = "truncate"
    cap: float = 2.0
    low: float = 0.5
    high: float = 5.0

    def __post_init__(self) -> None:
        from pgzoo.validate import check_choice, check_number

        check_choice("correction.level", self.level, LEVELS)
        check_choice("correction.mode", self.mode, MODES)
        check_number("correction.cap", self.cap, low=0.0, low_open=True, hint="TIS uses 2.0")
        check_number("correction.low", self.low, low=0.0, hint="IcePop uses 0.5")
        check_number("correction.high", self.high, hint="IcePop uses 5.0")
        if not self.high > self.low:
            raise ConfigError(f"correction.high={self.high!r} must be larger than correction.low={self.low!r}")

    # ------------------------------------------------------------------ weights
    def log_weights(self, batch: TokenBatch) -> torch.Tensor:
        """Uncorrected log-weights ℓ: ``[B, T]`` for level ``token``, ``[B]`` otherwise (0 at masked tokens)."""
        rho = batch.clean("old_logprobs") - batch.clean("rollout_logprobs")
        if self.level == "token":
            return rho
        total = rho.sum(-1)
        if self.level == "sequence":
            return total
        return total / batch.seq_lengths().clamp_min(1.0)

    def weights(self, batch: TokenBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The stop-gradient weights and their metrics.

        Returns ``(w, metrics)`` with ``w`` of shape ``[B, T]`` (level ``token``) or ``[B]`` (sequence levels);
        metrics ``correction/weight_mean``, ``correction/weight_max`` and ``correction/truncated_fraction``
        (``mode="truncate"``) or ``correction/masked_fraction`` (``mode="mask"``), over unmasked tokens (token
        level) or over sequences with at least one token (sequence levels).
        """
        log_w = self.log_weights(batch).detach().clamp(-_MAX_LOG_WEIGHT, _MAX_LOG_WEIGHT)
        if self.mode == "truncate":
            log_cap = math.log(self.cap)
            hit = log_w > log_cap
            w = log_w.clamp(max=log_cap).exp()
        else:
            log_low = math.log(self.low) if self.low > 0 else -math.inf
            hit = (log_w < log_low) | (log_w > math.log(self.high))
            w = torch.where(hit, 0.0, log_w.exp())
        where = batch.mask if self.level == "token" else batch.has_tokens()
        from pgzoo.objectives.diagnostics import masked_fraction, masked_max, masked_mean

        key = "correction/truncated_fraction" if self.mode == "truncate" else "correction/masked_fraction"
        metrics = {
            "correction/weight_mean": masked_mean(w, where),
            "correction/weight_max": masked_max(w, where),
            key: masked_fraction(hit, where),
        }
        return w, metrics

    def token_weights(self, batch: TokenBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weights broadcast to ``[B, T]`` (for token-level terms), with metrics."""
        w, metrics = self.weights(batch)
        return (w if w.dim() == 2 else w[:, None].expand_as(batch.logprobs)), metrics


def as_correction(value: Any) -> Correction | None:
    """Accept ``None``, a :class:`Correction`, or a plain dict of its fields (so YAML recipes can express one)."""
    if value is None or isinstance(value, Correction):
        return value
    if isinstance(value, dict):
        valid = [f.name for f in dataclasses.fields(Correction)]
        unknown = sorted(set(value) - set(valid))
        if unknown:
            raise ConfigError(
                f"correction has no field(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(valid)}"
            )
        return Correction(**value)
    raise ConfigError(
        f"correction must be None, a pgzoo.objectives.correction.Correction or a dict of its fields, got {type(value).__name__}"
    )
