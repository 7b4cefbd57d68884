"""The Objective base class, its output type, and the one shared aggregation.

An objective is a small class with a frozen ``Config`` dataclass of hyperparameters, a ``requires`` set of
TokenBatch fields it cannot do without, and a ``default_advantage`` estimator name. Calling it on a
:class:`~pgzoo.TokenBatch` returns an :class:`ObjectiveOutput` (``loss`` and detached tensor ``metrics``).

Subclasses implement ``compute(batch) -> ObjectiveOutput``; the per-token term is computed first and reduced by
:func:`aggregate`, so a new normalisation is a new mode there, not a branch in a loss.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from pgzoo.batch import TokenBatch
from pgzoo.errors import BatchError, ConfigError

AGGREGATIONS = ("seq-mean-token-sum", "seq-mean-token-mean", "token-mean", "constant", "seq-mean")


@dataclass
class ObjectiveOutput:
    """What an objective returns: a scalar ``loss`` (negative objective; differentiate it) and ``metrics``
    (name -> detached tensor; call ``.item()`` where you log, not inside the loss)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


def _as_tensor(x, like: torch.Tensor) -> torch.Tensor:
    return x.to(like) if isinstance(x, torch.Tensor) else torch.tensor(float(x), dtype=like.dtype, device=like.device)


def aggregate(term: torch.Tensor, batch: TokenBatch, mode: str, *, clean: bool = False) -> torch.Tensor:
    """Reduce a per-token term ``[B, T]`` (or a per-sequence term ``[B]`` for ``seq-mean``) to a scalar.

    Modes (m = mask, |y_i| = Σ_t m_it, N_seq/N_tok/L = the batch's normalisers):

    - ``seq-mean-token-sum``:  Σ_i Σ_t m·term / N_seq
    - ``seq-mean-token-mean``: Σ_i (1/|y_i|) Σ_t m·term / N_seq      (fully masked rows contribute 0)
    - ``token-mean``:          Σ_i Σ_t m·term / N_tok
    - ``constant``:            Σ_i Σ_t m·term / (N_seq · L)
    - ``seq-mean``:            Σ_i term_i / N_seq, for a ``[B]`` term; fully masked rows contribute 0

    Masked positions are replaced (not multiplied) by zero, so NaN there never reaches the result or gradient.
    ``clean=True`` promises that ``term`` is already exactly zero at masked positions (and fully masked rows) and
    skips that pass — the built-in objectives build their terms from masked inputs and use it.
    """
    if mode == "seq-mean":
        if not clean:
            term = torch.where(batch.has_tokens(), term, 0.0)
        total = term.sum()
        return total / _as_tensor(batch.sequence_count(), total).clamp_min(1.0)
    if not clean:
        term = batch.masked(term)
    if mode == "seq-mean-token-sum":
        total = term.sum()
        denom = _as_tensor(batch.sequence_count(), total)
    elif mode == "seq-mean-token-mean":
        total = (term.sum(-1) / batch.seq_lengths().clamp_min(1.0)).sum()
        denom = _as_tensor(batch.sequence_count(), total)
    elif mode == "token-mean":
        total = term.sum()
        denom = _as_tensor(batch.token_count(), total)
    elif mode == "constant":
        total = term.sum()
        denom = _as_tensor(batch.sequence_count(), total) * batch.length_constant()
    else:
        raise ConfigError(f"unknown aggregation mode {mode!r}; valid modes: {', '.join(AGGREGATIONS)}")
    # A shard with no tokens (possible under global normalisers) contributes exactly zero, never 0/0.
    return total / denom.clamp_min(1e-12)


ROW_SUM_MODES = ("seq-mean-token-sum", "seq-mean-token-mean", "token-mean", "constant")


def aggregate_row_sums(row_sums: torch.Tensor, batch: TokenBatch, mode: str) -> torch.Tensor:
    """``aggregate(term, batch, mode)`` from the row sums alone: ``row_sums`` ``[B]`` = Σ_t m·term_it (exactly 0 for
    fully masked rows). For a term that factors per row (a sequence-level ratio, a per-row weight times lp) the
    row sums cost [B] work or one reduction, instead of building the ``[B, T]`` term. Modes: :data:`ROW_SUM_MODES`.
    """
    if mode == "seq-mean-token-mean":
        total = (row_sums / batch.seq_lengths().clamp_min(1.0)).sum()
        denom = _as_tensor(batch.sequence_count(), total)
    elif mode == "seq-mean-token-sum":
        total = row_sums.sum()
        denom = _as_tensor(batch.sequence_count(), total)
    elif mode == "token-mean":
        total = row_sums.sum()
        denom = _as_tensor(batch.token_count(), total)
    elif mode == "constant":
        total = row_sums.sum()
        denom = _as_tensor(batch.sequence_count(), total) * batch.length_constant()
    else:
        raise ConfigError(f"aggregate_row_sums: mode {mode!r} is not one of {', '.join(ROW_SUM_MODES)}")
    return total / denom.clamp_min(1e-12)


class Objective:
    """Base class of every pgzoo objective.

    Class attributes a subclass sets:
        Config: a frozen dataclass of hyperparameters (its defaults are the objective's defaults).
        requires: TokenBatch fields that must not be None.
        default_advantage: name of the advantage estimator in :mod:`pgzoo.advantages` the objective expects.
        aggregation: one of :data:`AGGREGATIONS`.
        paper: the reference (title and arXiv id).

    ``default_advantage`` and ``paper`` may also be given per instance (``pgzoo.get("grpo",
    default_advantage="leave-one-out")``) or per registration; every other keyword is a ``Config`` field, except
    ``metrics``: ``pgzoo.get("minirl", metrics=False)`` returns the same loss and gradient with an empty
    ``out.metrics``, skipping the diagnostics' passes over the batch (on CPU they cost more than the loss itself;
    see docs/objectives.md, Speed).
    ``requires`` is finalised per instance: ``extra_requires()`` adds fields the config needs (a correction needs
    ``rollout_logprobs``, GRPO's β > 0 needs ``ref_logprobs``).
    """

    @dataclass(frozen=True)
    class Config:
        pass

    name: str = "objective"
    requires: ClassVar[frozenset[str]] = frozenset()
    default_advantage: ClassVar[str] = "group-mean-std"
    aggregation: ClassVar[str] = "token-mean"
    paper: ClassVar[str] = ""

    def __init__(
        self, name: str | None = None, *, default_advantage: str | None = None, paper: str | None = None,
        metrics: bool = True, **overrides: Any,
    ):
        self.validate_overrides(overrides)
        if not isinstance(metrics, bool):
            raise ConfigError(f"metrics={metrics!r} must be True (report diagnostics in out.metrics, the default) "
                              f"or False (loss only)")
        self.report_metrics = metrics
        if "correction" in overrides:
            from pgzoo.correction import as_correction

            overrides["correction"] = as_correction(overrides["correction"])
        self.config = self.Config(**overrides)
        if name is not None:
            self.name = name
        if default_advantage is not None:
            from pgzoo import advantages

            if default_advantage not in advantages.available():
                from pgzoo.errors import UnknownNameError

                raise UnknownNameError("advantage estimator", default_advantage, advantages.available())
            self.default_advantage = default_advantage
        if paper is not None:
            self.paper = paper
        self._check_config()
        self.requires = frozenset(type(self).requires | self.extra_requires())

    @classmethod
    def validate_overrides(cls, overrides: dict[str, Any]) -> None:
        valid = [f.name for f in dataclasses.fields(cls.Config)]
        unknown = sorted(set(overrides) - set(valid) - {"default_advantage", "paper", "metrics"})
        if unknown:
            raise ConfigError(
                f"{cls.__name__} has no parameter(s) {', '.join(map(repr, unknown))}; "
                f"valid keys: {', '.join(valid) or '(none)'} (and default_advantage, paper, metrics)"
            )

    def extra_requires(self) -> frozenset[str]:
        """Fields required because of the config (e.g. ``ref_logprobs`` when β > 0); subclasses extend."""
        if getattr(self.config, "correction", None) is not None:
            return frozenset({"rollout_logprobs"})
        return frozenset()

    def _check_config(self) -> None:
        """Validate hyperparameter values; subclasses raise ConfigError with the field and the fix."""

    def check_requires(self, batch: TokenBatch) -> None:
        for name in sorted(self.requires):
            if getattr(batch, name) is None:
                raise BatchError(
                    name,
                    f"objective {self.name!r} requires it but it is None",
                    f"pass {name}=... (see docs/objectives.md for what {self.name!r} needs)",
                )

    def __call__(self, batch: TokenBatch) -> ObjectiveOutput:
        if not isinstance(batch, TokenBatch):
            raise ConfigError(f"objective {self.name!r} takes a pgzoo.TokenBatch, got {type(batch).__name__}")
        self.check_requires(batch)
        return self.compute(batch)

    def compute(self, batch: TokenBatch) -> ObjectiveOutput:
        raise NotImplementedError

    def __repr__(self) -> str:
        params = ", ".join(f"{f.name}={getattr(self.config, f.name)!r}" for f in dataclasses.fields(self.config))
        if not self.report_metrics:
            params += ", metrics=False"
        return f"{type(self).__name__}(name={self.name!r}, {params})"


# ---------------------------------------------------------------------------------------------- shared helpers
# Log-ratios entering an exponential *with gradient* are clamped to ±MAX_LOG_RATIO (as verl does): r stays within
# [2e-9, 4.9e8], so the loss and its gradient are finite in float32 however far the policies drift. Inside the
# band the gradient is exact.
MAX_LOG_RATIO = 20.0


def log_bounds(eps_low: float | None, eps_high: float | None) -> tuple[float, float]:
    """log(1 − ε_low) and log(1 + ε_high); a missing bound (None, or ε_low ≥ 1) is ∓inf."""
    lo = math.log1p(-eps_low) if eps_low is not None and eps_low < 1 else -math.inf
    hi = math.log1p(eps_high) if eps_high is not None else math.inf
    return lo, hi


def ppo_clip_flags(log_r: torch.Tensor, adv: torch.Tensor, lo: float, hi: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Where PPO's min(r·A, clip(r)·A) takes the clipped (constant) branch.

    ``low``: A < 0 and r < 1 − ε_low; ``high``: A > 0 and r > 1 + ε_high. Elsewhere the surrogate is r·A with
    gradient; this is also MiniRL's mask M (eq. 7) with proximal policy π_θold. Comparisons are in log space.
    """
    low = (adv < 0) & (log_r < lo)
    high = (adv > 0) & (log_r > hi)
    return low, high


def check_eps(cls_name: str, eps_low, eps_high, *, low_optional: bool = False, high_optional: bool = False) -> None:
    """Validate clip ranges, raising ConfigError naming the key."""
    for key, value, optional in (("eps_low", eps_low, low_optional), ("eps_high", eps_high, high_optional)):
        if value is None and optional:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            hint = " or None (no bound)" if optional else ""
            raise ConfigError(f"{cls_name}: {key}={value!r} must be a number >= 0{hint}")
    if eps_low is not None and eps_low >= 1 and not low_optional:
        raise ConfigError(f"{cls_name}: eps_low={eps_low!r} must be < 1 (the lower clip bound is 1 - eps_low > 0)")


def check_aggregation(cls_name: str, mode: str) -> None:
    token_modes = [m for m in AGGREGATIONS if m != "seq-mean"]
    if mode not in token_modes:
        raise ConfigError(f"{cls_name}: aggregation={mode!r} is not one of {', '.join(token_modes)}")
