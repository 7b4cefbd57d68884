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

Three further options, from the rollout corrections of OpenRLHF, slime and verl (all off by default):

- ``mask_level`` (OpenRLHF's ``seq-mask-tis``): with ``mode="mask"`` the band is read at this level while the weight
  stays at ``level``: ``level="token", mask_level="geometric"`` keeps each token's own ratio exp(ρ_it) in sequences
  whose geometric-mean ratio lies in [low, high] and zeroes whole sequences outside it;
- ``veto`` (slime's ``veto_threshold``, verl's earlier ``rollout_token_veto_threshold``): a sequence with any
  unmasked token whose ratio exp(ρ_it) is below ``veto`` gets weight 0 on every token;
- ``normalize`` (verl's ``rollout_is_batch_normalize``): the weights, after truncation, masking and veto, are divided
  by their mean over the batch (over unmasked tokens at level ``token``, over sequences with a token otherwise), so
  they average 1. The mean is taken over the TokenBatch passed in: micro-batches then each divide by their own
  mean, so with ``normalize=True`` the micro-batch gradients do not add up to the whole batch's (verl computes the
  weights once over the whole training batch; pass the whole mini-batch in one call for that), and the objective
  instance says so: its ``shard_additive`` is False.

Named presets (``correction="icepop"``; :data:`PRESETS`): ``tis`` (token, truncate at 2), ``icepop`` (token, mask
outside [0.5, 5]: the Ring-1T report's IcePop, OpenRLHF's ``ICEPOP``) and ``seq-mask-tis`` (token weights, sequences
masked by their geometric-mean ratio outside [0.5, 5]: OpenRLHF's ``seq-mask-tis``), with OpenRLHF's default band.

Everything is computed in log space (clamped before the exponential), so huge discrepancies give finite weights.
The correction is off by default in every objective (faithful to the original papers); the MiniRL family carries
its own train–inference IS weight and takes no correction.

References: Yao et al., "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training" (2025, TIS / MIS);
the IcePop masking of the Ring-1T report (inclusionAI, 2025); MiniRL (arXiv 2512.01374) §3 for the discrepancy itself;
Liu, Li et al., "When Speed Kills Stability: Demystifying RL Collapse from the Training-Inference Mismatch" (2025;
verl's rollout correction: batch normalisation, effective sample size, χ²); slime's TIS helper (veto).

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
        mask_level: the level whose weight the band is read at (``mode="mask"`` only; None: ``level``). With
            ``level="token"`` it may be ``"sequence"`` or ``"geometric"``: whole sequences are masked, the kept ones
            keep their per-token weights (OpenRLHF's ``seq-mask-tis``: ``geometric``).
        veto: a sequence with any unmasked token whose ratio is below ``veto`` (0 < veto < 1) gets weight 0;
            None (default) vetoes nothing (slime's ``veto_threshold`` is 1e-4).
        normalize: divide the weights by their batch mean (verl's ``rollout_is_batch_normalize``); default False.
    """

    level: str = "token"
    mode: str = "truncate"
    cap: float = 2.0
    low: float = 0.5
    high: float = 5.0
    mask_level: str | None = None
    veto: float | None = None
    normalize: bool = False

    def __post_init__(self) -> None:
        from pgzoo.validate import check_bool, check_choice, check_number

        check_choice("correction.level", self.level, LEVELS)
        check_choice("correction.mode", self.mode, MODES)
        check_number("correction.cap", self.cap, low=0.0, low_open=True, hint="TIS uses 2.0")
        check_number("correction.low", self.low, low=0.0, hint="IcePop uses 0.5")
        check_number("correction.high", self.high, hint="IcePop uses 5.0")
        if not self.high > self.low:
            raise ConfigError(f"correction.high={self.high!r} must be larger than correction.low={self.low!r}")
        if self.mask_level is not None:
            check_choice("correction.mask_level", self.mask_level, LEVELS)
            if self.mode != "mask":
                raise ConfigError(f"correction.mask_level={self.mask_level!r} says where the band [low, high] is "
                                  "read, which only mode='mask' uses; set mode='mask' or leave mask_level=None")
            if self.mask_level != self.level and self.level != "token":
                raise ConfigError(
                    f"correction.mask_level={self.mask_level!r} with level={self.level!r}: a band read at another "
                    "level than the weight's only works from a token weight to a sequence mask (level='token', "
                    "mask_level='sequence' or 'geometric'); set mask_level=None or level='token'")
        check_number("correction.veto", self.veto, low=0.0, high=1.0, low_open=True, high_open=True, optional=True,
                     hint="a ratio threshold below 1; slime uses 1e-4; null disables the veto")
        check_bool("correction.normalize", self.normalize)

    def _log_weights_at(self, batch: TokenBatch, level: str) -> torch.Tensor:
        rho = batch.clean("old_logprobs") - batch.clean("rollout_logprobs")
        if level == "token":
            return rho
        total = rho.sum(-1)
        if level == "sequence":
            return total
        return total / batch.seq_lengths().clamp_min(1.0)

    # ------------------------------------------------------------------ weights
    def log_weights(self, batch: TokenBatch) -> torch.Tensor:
        """Uncorrected log-weights ℓ: ``[B, T]`` for level ``token``, ``[B]`` otherwise (0 at masked tokens)."""
        return self._log_weights_at(batch, self.level)

    def weights(self, batch: TokenBatch, report: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The stop-gradient weights and their metrics.

        Returns ``(w, metrics)`` with ``w`` of shape ``[B, T]`` (level ``token``) or ``[B]`` (sequence levels);
        metrics ``correction/weight_mean``, ``correction/weight_max`` (before ``normalize``),
        ``correction/truncated_fraction`` (``mode="truncate"``) or ``correction/masked_fraction`` (``mode="mask"``),
        ``correction/ess``, ``correction/chi2_token``, ``correction/chi2_seq``, and with the options on
        ``correction/veto_fraction`` and ``correction/batch_norm_factor`` (docs/metrics.md). Statistics are over
        unmasked tokens (token level) or over sequences with at least one token (sequence levels); the masked
        fraction is over the units of ``mask_level``. ``report=False``: the same weights and no metrics (``{}``),
        without the metrics' passes over the batch.
        """
        from pgzoo.objectives.diagnostics import masked_fraction, masked_max, masked_mean

        log_w = self.log_weights(batch).detach().clamp(-_MAX_LOG_WEIGHT, _MAX_LOG_WEIGHT)
        where = batch.mask if self.level == "token" else batch.has_tokens()
        metrics: dict[str, torch.Tensor] = {}
        if self.mode == "truncate":
            log_cap = math.log(self.cap)
            if report:
                metrics["correction/truncated_fraction"] = masked_fraction(log_w > log_cap, where)
            w = log_w.clamp_(max=log_cap).exp_()  # log_w is this call's own tensor
        else:
            gate_level = self.mask_level or self.level
            gate = log_w if gate_level == self.level else self._log_weights_at(batch, gate_level).detach()
            kept = band_indicator(gate, math.log(self.low) if self.low > 0 else -math.inf, math.log(self.high))
            if report:
                hit_where = batch.mask if gate_level == "token" else batch.has_tokens()
                metrics["correction/masked_fraction"] = masked_fraction(kept == 0, hit_where)
            # a sequence-level gate on token weights broadcasts over the row's tokens
            w = log_w.exp_().mul_(kept[:, None] if kept.dim() < log_w.dim() else kept)
        rho = batch.clean("old_logprobs") - batch.clean("rollout_logprobs") if report or self.veto is not None else None
        if self.veto is not None:
            # slime compares the raw token log-ratio with log(veto); masked positions never veto
            vetoed = ((rho < math.log(self.veto)) & batch.mask).any(-1)
            w = torch.where(vetoed[:, None] if w.dim() == 2 else vetoed, 0.0, w)
            if report:
                metrics["correction/veto_fraction"] = masked_fraction(vetoed, batch.has_tokens())
        if report:
            metrics["correction/weight_mean"] = masked_mean(w, where)
            metrics["correction/weight_max"] = masked_max(w, where)
            metrics.update(_spread_metrics(w, where, rho, batch))
        if self.normalize:
            mean = (metrics["correction/weight_mean"] if report else masked_mean(w, where)).to(w.dtype)
            # verl divides only by a mean above 1e-8 (an all-zero batch keeps its zeros); no host sync here
            factor = torch.where(mean > 1e-8, mean, 1.0)
            w = w / factor
            if report:
                metrics["correction/batch_norm_factor"] = factor
        return w, metrics

    def token_weights(self, batch: TokenBatch, report: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weights broadcast to ``[B, T]`` (for token-level terms), with metrics (none with ``report=False``)."""
        w, metrics = self.weights(batch, report)
        return (w if w.dim() == 2 else w[:, None].expand_as(batch.logprobs)), metrics


def band_indicator(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """1.0 where low ≤ x ≤ high, else 0.0, in ``x``'s dtype (``x`` finite; ``low`` may be −inf).

    Float arithmetic, 1 − |sign(clamp(x) − x)|, instead of comparisons and a select: on CPU a bool tensor costs a pass
    per comparison and ``where`` on it several, while these are one allocation and in-place passes.
    """
    return x.clamp(low, high).sub_(x).sign_().abs_().neg_().add_(1.0)


# exp(2·20): the χ² metrics clamp the log-ratio at ±20 as verl does, so exp(2ℓ) stays finite in float32.
_CHI2_MAX_LOG = 20.0


def _spread_metrics(w: torch.Tensor, where: torch.Tensor, rho: torch.Tensor, batch: TokenBatch) -> dict:
    """How spread the weights are: the normalised effective sample size of the applied weights ``w`` over their
    units ``where``, ESS = (Σw)² / (n·Σw²) ∈ [0, 1] (1: all equal; verl's ``rollout_is_eff_sample_size`` =
    1/mean((w/mean w)²) at token level), and verl's χ² divergences of the raw ratio exp(ρ):
    ``chi2_token`` = mean over tokens of exp(ρ)² − 1, ``chi2_seq`` = mean over sequences of exp(Σ_t ρ)² − 1."""
    wd = torch.where(where, w.detach(), 0.0)
    n = torch.count_nonzero(where).to(wd.dtype)
    s1, s2 = wd.sum(), wd.square().sum()
    ess = torch.where(s2 > 0, s1.square() / (n.clamp_min(1.0) * s2.clamp_min(torch.finfo(wd.dtype).tiny)), 0.0)
    rho_tok = rho.clamp(-_CHI2_MAX_LOG, _CHI2_MAX_LOG)
    sq_tok = torch.where(batch.mask, (2.0 * rho_tok).exp(), 0.0)
    n_tok = batch.local_token_count().clamp_min(1.0)
    sq_seq = torch.where(batch.has_tokens(), (2.0 * rho.sum(-1).clamp(-_CHI2_MAX_LOG, _CHI2_MAX_LOG)).exp(), 0.0)
    n_seq = batch.has_tokens().sum().to(rho.dtype).clamp_min(1.0)
    any_token = batch.mask.any()
    return {
        "correction/ess": ess,
        "correction/chi2_token": torch.where(any_token, sq_tok.sum() / n_tok - 1.0, 0.0),
        "correction/chi2_seq": torch.where(any_token, sq_seq.sum() / n_seq - 1.0, 0.0),
    }


# Named corrections (``correction="icepop"``), with OpenRLHF's default band [0.5, 5] and TIS's cap 2.
PRESETS: dict[str, dict[str, Any]] = {
    "tis": dict(level="token", mode="truncate", cap=2.0),
    "icepop": dict(level="token", mode="mask", low=0.5, high=5.0),
    "seq-mask-tis": dict(level="token", mode="mask", mask_level="geometric", low=0.5, high=5.0),
}


def as_correction(value: Any) -> Correction | None:
    """Accept ``None``, a :class:`Correction`, a plain dict of its fields (so YAML recipes can express one), or the
    name of a preset in :data:`PRESETS` (``"tis"``, ``"icepop"``, ``"seq-mask-tis"``)."""
    if value is None or isinstance(value, Correction):
        return value
    if isinstance(value, str):
        if value not in PRESETS:
            raise ConfigError(f"correction={value!r} is not a preset; presets: {', '.join(PRESETS)} (or pass a dict "
                              "of Correction fields)")
        return Correction(**PRESETS[value])
    if isinstance(value, dict):
        valid = [f.name for f in dataclasses.fields(Correction)]
        unknown = sorted(set(value) - set(valid))
        if unknown:
            raise ConfigError(
                f"correction has no field(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(valid)}"
            )
        return Correction(**value)
    raise ConfigError(
        f"correction must be None, a preset name ({', '.join(PRESETS)}), a pgzoo.objectives.correction.Correction or a "
        f"dict of its fields, got {type(value).__name__}"
    )
