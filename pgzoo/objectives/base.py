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
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from pgzoo.batch import TokenBatch
from pgzoo.errors import BatchError, ConfigError
from pgzoo.validate import check_bool, check_choice, check_int, check_number

AGGREGATIONS = ("seq-mean-token-sum", "seq-mean-token-mean", "token-mean", "constant", "token-sum", "seq-mean")


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
    - ``token-sum``:           Σ_i Σ_t m·term                   (no normaliser)
    - ``seq-mean``:            Σ_i term_i / N_seq, for a ``[B]`` term; fully masked rows contribute 0

    verl's ``loss_agg_mode`` values map one to one: ``token-mean``, ``token-sum``, ``seq-mean-token-sum`` and
    ``seq-mean-token-mean`` by name, ``seq-mean-token-sum-norm`` is ``constant`` (verl's ``loss_scale_factor`` is
    ``max_tokens``; both default to T). ``token-sum`` has no normaliser to carry a global count: a trainer that
    averages gradients over W processes gets Σ/W (verl multiplies by its data-parallel size to undo that).

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
    elif mode == "token-sum":
        return term.sum()
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
    # False when the term depends on statistics of the whole TokenBatch (Clip-Cov and KL-Cov select tokens by the
    # batch's covariance): micro-batches then each select on their own, as verl's do, and their gradients do not
    # add up to the whole batch's.
    shard_additive: ClassVar[bool] = True

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
            from pgzoo.objectives.correction import as_correction

            overrides["correction"] = as_correction(overrides["correction"])
        self.config = self.Config(**overrides)
        if name is not None:
            self.name = name
        self._check_types()
        if default_advantage is not None:
            from pgzoo.advantages import registry as advantages

            self.default_advantage = advantages.entry(default_advantage)[0]  # canonical; unknown: nearest names
        if paper is not None:
            if not isinstance(paper, str):
                raise ConfigError(f"{self.name}: paper={paper!r} must be a string (title and arXiv id)")
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

    def _check_types(self) -> None:
        """Check every Config value against its annotation, strictly (runs before :meth:`_check_config`).

        ``bool`` accepts only True/False (``"false"`` is an error, not True); ``float`` any real number but a bool
        or a string (ints too; ±inf allowed, NaN never); ``int`` only integers; ``str`` only strings; ``Literal``
        only its values; ``X | None`` also None, and so does any field whose default is None. Other annotations (a Correction, a union of classes) are left to
        the objective. Ranges are the objective's: :meth:`_check_config` with :func:`check_number` and friends.
        """
        hints = field_types(type(self.config))
        for f in dataclasses.fields(self.config):
            value = getattr(self.config, f.name)
            if value is None and f.default is None:  # a field whose default is None takes None, however annotated
                continue
            check_annotated(f"{self.name}: {f.name}", value, hints.get(f.name))

    def _check_config(self) -> None:
        """Validate hyperparameter values and ranges; subclasses raise ConfigError with the field and the fix,
        usually through the shared helpers ``check_number(f"{self.name}: key", value, low=..., high=...)``,
        ``check_int``, ``check_bool`` and ``check_choice`` (:mod:`pgzoo.validate`)."""

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
        if torch.is_grad_enabled() and not batch.logprobs.requires_grad:
            # Only with grad mode on: under torch.no_grad() / inference_mode a loss is evaluated from plain tensors.
            raise BatchError(
                "logprobs",
                f"does not require grad, so objective {self.name!r} would return a loss with no gradient",
                "compute logprobs from the model with grad enabled (not .detach()ed, not under no_grad); to only "
                "evaluate the loss, call the objective under torch.no_grad()")
        return self.compute(batch)

    def compute(self, batch: TokenBatch) -> ObjectiveOutput:
        raise NotImplementedError

    def __repr__(self) -> str:
        params = ", ".join(f"{f.name}={getattr(self.config, f.name)!r}" for f in dataclasses.fields(self.config))
        if not self.report_metrics:
            params += ", metrics=False"
        return f"{type(self).__name__}(name={self.name!r}, {params})"


# ---------------------------------------------------------------------------------------------- shared helpers
_HINTS: dict[type, dict[str, Any]] = {}


def field_types(config_cls: type) -> dict[str, Any]:
    """The resolved annotations of a Config dataclass (cached; {} when a name cannot be resolved)."""
    if config_cls not in _HINTS:
        try:
            _HINTS[config_cls] = typing.get_type_hints(config_cls)
        except Exception:  # an annotation naming something not importable here: check nothing by type
            _HINTS[config_cls] = {}
    return _HINTS[config_cls]


def check_annotated(key: str, value: Any, hint: Any) -> None:
    """Strict check of ``value`` against a type annotation (see :meth:`Objective._check_types`)."""
    if hint is None or hint is Any:
        return
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return check_annotated(key, value, rest[0])
        if all(a in (int, float) for a in rest):
            return check_annotated(key, value, float)
        return  # a union of classes: the objective's own check
    if origin is typing.Literal:
        choices = typing.get_args(hint)
        if value not in choices or isinstance(value, bool) != any(isinstance(c, bool) for c in choices):
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(repr, choices))}")
        return
    if hint is bool:
        check_bool(key, value)
    elif hint is float:
        check_number(key, value, finite=False)
    elif hint is int:
        check_int(key, value)
    elif hint is str and not isinstance(value, str):
        raise ConfigError(f"{key}={value!r} must be a string, not {type(value).__name__}")


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
        check_number(f"{cls_name}: {key}", value, low=0.0, optional=optional, finite=False)
    if eps_low is not None and eps_low >= 1 and not low_optional:
        raise ConfigError(f"{cls_name}: eps_low={eps_low!r} must be < 1 (the lower clip bound is 1 - eps_low > 0)")


def check_aggregation(cls_name: str, mode: str) -> None:
    check_choice(f"{cls_name}: aggregation", mode, [m for m in AGGREGATIONS if m != "seq-mean"])


def advantage_factor(batch: TokenBatch) -> torch.Tensor:
    """The advantages ready to multiply a masked ``[B, T]`` term: ``[B, 1]`` for per-sequence advantages (rows
    without tokens set to 0, so a NaN there never reaches the product), else ``batch.token_advantages()``.

    A ``[B, 1]`` factor broadcasts in the product instead of materialising the ``[B, T]`` advantages: two passes
    fewer for objectives that need the advantages only as a factor.
    """
    adv = batch.advantages
    if adv.dim() == 2:
        return batch.token_advantages()
    return torch.where(batch.has_tokens(), adv.to(batch.logprobs.dtype), 0.0)[:, None]
