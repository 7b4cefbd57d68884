"""The Objective base class, its output type, and the one shared aggregation.

An objective is a small class with a frozen ``Config`` dataclass of hyperparameters, a ``requires`` set of
TokenBatch fields it cannot do without, and a ``default_advantage`` estimator name. Calling it on a
:class:`~pgzoo.TokenBatch` returns an :class:`ObjectiveOutput` (``loss`` and detached tensor ``metrics``).

A family implements its policy term and its own metrics; :meth:`Objective.compute` is the one template that
turns the term into a loss::

    p          = policy_term(batch)                 the family's term (a :class:`Term`: per token, per sequence,
                                                    or per-row sums)
    p'         = E·O·c·p                            entropy and off-policy masks, training–inference correction c
    p''        = p' − β·KL                          KL to the reference (:mod:`pgzoo.objectives.shaping`)
    loss       = −aggregate(p'') − entropy_coef·H̄    one normalisation (:func:`normalise`), the entropy bonus
    metrics    = term_metrics | correction | shaping (skipped entirely with ``metrics=False``)

so a new normalisation is a new mode in :func:`normalise`, not a branch in a loss, and every shaping option
composes with every objective whose term it is defined on (:meth:`Objective.check_shaping` refuses the rest).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch

from pgzoo.batch import TokenBatch
from pgzoo.errors import BatchError, ConfigError
from pgzoo.objectives.ratios import importance_log_ratio, ratio
from pgzoo.objectives.shaping import NO_SHAPING, Shaper, check_shaping, is_shaped, shaping_requires
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


def normalise(total: torch.Tensor, batch: TokenBatch, mode: str) -> torch.Tensor:
    """``total`` divided by the normaliser of ``mode``: the one place where a mode picks its denominator.

    N_seq for the ``seq-mean*`` modes, N_tok for ``token-mean``, N_seq·L for ``constant``, none for ``token-sum``.
    """
    if mode == "token-sum":
        return total
    if mode == "seq-mean":
        # a [B] term is at most N_seq rows of weight 1: an empty batch divides by 1 (exactly 0)
        return total / _as_tensor(batch.sequence_count(), total).clamp_min(1.0)
    if mode in ("seq-mean-token-sum", "seq-mean-token-mean"):
        denom = _as_tensor(batch.sequence_count(), total)
    elif mode == "token-mean":
        denom = _as_tensor(batch.token_count(), total)
    elif mode == "constant":
        denom = _as_tensor(batch.sequence_count(), total) * batch.length_constant()
    else:
        raise ConfigError(f"unknown aggregation mode {mode!r}; valid modes: {', '.join(AGGREGATIONS)}")
    # A shard with no tokens (possible under global normalisers) contributes exactly zero, never 0/0.
    return total / denom.clamp_min(1e-12)


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
        return normalise(term.sum(), batch, mode)
    if mode not in AGGREGATIONS:
        raise ConfigError(f"unknown aggregation mode {mode!r}; valid modes: {', '.join(AGGREGATIONS)}")
    if not clean:
        term = batch.masked(term)
    if mode == "seq-mean-token-mean":
        return normalise((term.sum(-1) / batch.seq_lengths().clamp_min(1.0)).sum(), batch, mode)
    return normalise(term.sum(), batch, mode)


ROW_SUM_MODES = ("seq-mean-token-sum", "seq-mean-token-mean", "token-mean", "constant")


def aggregate_row_sums(row_sums: torch.Tensor, batch: TokenBatch, mode: str) -> torch.Tensor:
    """``aggregate(term, batch, mode)`` from the row sums alone: ``row_sums`` ``[B]`` = Σ_t m·term_it (exactly 0 for
    fully masked rows). For a term that factors per row (a sequence-level ratio, a per-row weight times lp) the
    row sums cost [B] work or one reduction, instead of building the ``[B, T]`` term. Modes: :data:`ROW_SUM_MODES`.
    """
    if mode not in ROW_SUM_MODES:
        raise ConfigError(f"aggregate_row_sums: mode {mode!r} is not one of {', '.join(ROW_SUM_MODES)}")
    if mode == "seq-mean-token-mean":
        return normalise((row_sums / batch.seq_lengths().clamp_min(1.0)).sum(), batch, mode)
    return normalise(row_sums.sum(), batch, mode)


class Term(NamedTuple):
    """A family's policy term p, before :meth:`Objective.compute` applies correction, shaping and aggregation.

    value: p, exactly 0 at masked positions and on rows without tokens; its shape is set by ``level``:
        ``"token"``: ``[B, T]``, p_it per token;
        ``"sequence"``: ``[B]``, one p_i per sequence (GSPO, GMPO), averaged over sequences (``seq-mean``);
        ``"rows"``: ``[B]``, Σ_t m·p_it of a token term that factors per row (a fast path: no ``[B, T]`` term);
        an objective returns it only with the per-token options (correction, entropy and off-policy masks) off.
    lp: the masked logprobs with gradient if the family built them (the shaping reuses them), else None.
    ratio: the importance ratio r with gradient that ``bias_correction_kl`` puts on the KL term, if the family
        built it (``[B, T]``, or ``[B]`` for a sequence term); None: :meth:`Objective.kl_ratio` builds it when needed.
    advantages: for a sequence term, the ``[B]`` advantages in p_i (the off-policy mask reads their sign); None for
        token terms (the mask reads the batch's token advantages).
    saved: intermediates the family's :meth:`Objective.term_metrics` reuses (read only when metrics are on).
    """

    value: torch.Tensor
    level: str = "token"
    lp: torch.Tensor | None = None
    ratio: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    saved: dict[str, Any] | None = None


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
    ``rollout_logprobs``, β > 0 needs ``ref_logprobs``).

    A family implements :meth:`policy_term` (and :meth:`term_metrics`); :meth:`compute`, the template, does the
    rest. A subclass may still override :meth:`compute` whole (it then owns correction, shaping and aggregation).
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
    # add up to the whole batch's. An instance is False also when one of its options is batch-dependent
    # (:meth:`batch_dependent_options`).
    shard_additive: ClassVar[bool] = True
    # Config fields where ±inf means something (e.g. MiniRL's is_cap = inf: no truncation); in every other float
    # field an infinity is refused by the shared check (:meth:`_check_types`).
    infinite_ok: ClassVar[frozenset[str]] = frozenset()
    # (low, high) pairs of Config fields that bound an interval: the shared check refuses low >= high.
    bands: ClassVar[tuple[tuple[str, str], ...]] = ()
    # False when the family folds the correction weight into its own term (VESPO's sequence weight): the template
    # then leaves it out.
    applies_correction: ClassVar[bool] = True

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
        # the shaping options in effect: the config's own, or all off for a config without shaping fields
        self.shaping = self.config if is_shaped(self.config) else NO_SHAPING
        self.check_shaping()
        self._check_finite_and_bands()
        self.requires = frozenset(type(self).requires | self.extra_requires())
        # The class says whether the family's term is additive over shards; two options make any objective depend on
        # the whole TokenBatch it is given, whatever its family: this instance says so too.
        self.shard_additive = type(self).shard_additive and not self.batch_dependent_options()

    @classmethod
    def validate_overrides(cls, overrides: dict[str, Any]) -> None:
        valid = [f.name for f in dataclasses.fields(cls.Config)]
        unknown = sorted(set(overrides) - set(valid) - {"default_advantage", "paper", "metrics"})
        if unknown:
            raise ConfigError(
                f"{cls.__name__} has no parameter(s) {', '.join(map(repr, unknown))}; "
                f"valid keys: {', '.join(valid) or '(none)'} (and default_advantage, paper, metrics)"
            )

    def batch_dependent_options(self) -> list[str]:
        """The options in effect that read statistics of the whole TokenBatch (so micro-batches each take their own):
        ``top_entropy_quantile`` < 1 (the quantile of the batch's entropies) and ``correction.normalize`` (the
        weights' batch mean)."""
        out = []
        if self.shaping.top_entropy_quantile < 1.0:
            out.append("top_entropy_quantile")
        correction = getattr(self.config, "correction", None)
        if correction is not None and correction.normalize:
            out.append("correction.normalize")
        return out

    def extra_requires(self) -> frozenset[str]:
        """Fields required because of the config (e.g. ``ref_logprobs`` when β > 0); subclasses extend."""
        extra = shaping_requires(self.shaping)
        if getattr(self.config, "correction", None) is not None:
            extra.add("rollout_logprobs")
        return frozenset(extra)

    def term_level(self) -> str:
        """``"token"`` if the family's term is per token, ``"sequence"`` if it is one term per sequence (decides
        which shaping options apply; a family whose level depends on its config overrides)."""
        return "token"

    def aggregation_mode(self) -> str:
        """The token-level aggregation of the term (:func:`aggregate`): the config's ``aggregation`` if it has
        one, else the class's. A sequence term is always averaged over sequences (``seq-mean``)."""
        return getattr(self.config, "aggregation", type(self).aggregation)

    def check_shaping(self) -> None:
        """Validate the shaping options and refuse those that cannot apply to this objective's term."""
        c = self.shaping
        if c is NO_SHAPING:
            return
        check_shaping(self.name, c)
        if c.top_entropy_quantile < 1.0 and self.term_level() == "sequence":
            raise ConfigError(
                f"{self.name}: top_entropy_quantile={c.top_entropy_quantile!r} drops tokens by their entropy, but "
                f"{self.name}'s term is one per sequence (a ratio over all its tokens): there is no token term to "
                "drop; leave top_entropy_quantile=1" + (" or use gspo-token" if self.name == "gspo" else ""))
        if c.correct_kl and not any(f.name == "correction" for f in dataclasses.fields(self.config)):
            raise ConfigError(
                f"{self.name}: correct_kl=True weights the KL term by the training–inference correction, but "
                f"{self.name} takes no correction (its own importance weight belongs to its policy term); leave "
                "correct_kl=False")

    def _check_types(self) -> None:
        """Check every Config value against its annotation, strictly (runs before :meth:`_check_config`).

        ``bool`` accepts only True/False (``"false"`` is an error, not True); ``float`` any finite real number but a
        bool or a string (ints too; NaN never; ±inf only in a field listed in :attr:`infinite_ok`, where it has a
        meaning: an infinity is not a coefficient); ``int`` only integers; ``str`` only strings; ``Literal`` only
        its values; ``X | None`` also None, and so does any field whose default is None. Other annotations (a
        Correction, a union of classes) are left to the objective. Ranges are the objective's: :meth:`_check_config`
        with :func:`check_number` and friends; then :meth:`_check_finite_and_bands`.
        """
        hints = field_types(type(self.config))
        for f in dataclasses.fields(self.config):
            value = getattr(self.config, f.name)
            if value is None and f.default is None:  # a field whose default is None takes None, however annotated
                continue
            check_annotated(f"{self.name}: {f.name}", value, hints.get(f.name))

    def _check_finite_and_bands(self) -> None:
        """The shared checks after the objective's own (whose messages name its ranges): no ±inf outside
        :attr:`infinite_ok`, and every pair of :attr:`bands` a non-empty interval."""
        for f in dataclasses.fields(self.config):
            value = getattr(self.config, f.name)
            if isinstance(value, float) and math.isinf(value) and f.name not in self.infinite_ok:
                raise ConfigError(f"{self.name}: {f.name}={value!r} must be finite: an infinity is not a coefficient"
                                  + (" (null means no bound)" if f.default is None else ""))
        for low_key, high_key in self.bands:
            low, high = getattr(self.config, low_key), getattr(self.config, high_key)
            if low is not None and high is not None and not low < high:
                raise ConfigError(f"{self.name}: {low_key}={low!r} must be below {high_key}={high!r}: the band "
                                  f"({low_key}, {high_key}) would hold nothing and the option would do nothing")

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
        # 16-bit inputs are computed in float32: exp of a log-ratio overflows float16 past |log r| ≈ 11 (and a
        # probability of 1 rounds 1 − p to 0), which made losses, gradients or metrics inf/NaN; the loss comes back
        # in float32 and its gradient reaches the 16-bit logprobs in their own dtype.
        return self.compute(batch.in_float32())

    # ------------------------------------------------------------------------------------------ the template
    def compute(self, batch: TokenBatch) -> ObjectiveOutput:
        """The template: the family's term, then correction, shaping, aggregation and the metric merge, once."""
        term = self.policy_term(batch)
        shaper = Shaper(self.shaping, batch, term.lp, self.report_metrics)
        weight, correction_metrics = self.correction_weights(batch, term.level)
        value = shaper.policy(term.value, self.mask_advantages(batch, term), weight)
        if self.shaping.beta > 0:
            value = shaper.total(value, term.level, self.bias_ratio(batch, term, shaper), weight)
        loss = shaper.bonus(-self.reduce(value, batch, term.level))
        if not self.report_metrics:
            return ObjectiveOutput(loss, {})
        metrics = self.term_metrics(batch, term)
        metrics.update(correction_metrics)
        metrics.update(shaper.metrics)
        return ObjectiveOutput(loss, metrics)

    def policy_term(self, batch: TokenBatch) -> Term:
        """The family's policy term p (see :class:`Term`); every family implements it."""
        raise NotImplementedError(f"{type(self).__name__} implements neither policy_term nor compute")

    def term_metrics(self, batch: TokenBatch, term: Term) -> dict[str, torch.Tensor]:
        """The family's own metrics (detached tensors), from the term's ``saved`` intermediates; none by default."""
        return {}

    def correction_weights(self, batch: TokenBatch, level: str) -> tuple[torch.Tensor | None, dict]:
        """The training–inference correction weight c shaped like the term (``[B, T]`` for a token term, ``[B]``
        for a sequence term) and its metrics; (None, {}) without a correction."""
        correction = getattr(self.config, "correction", None)
        if correction is None or not self.applies_correction:
            return None, {}
        if level == "sequence":
            return correction.weights(batch, self.report_metrics)
        return correction.token_weights(batch, self.report_metrics)

    def mask_advantages(self, batch: TokenBatch, term: Term) -> torch.Tensor | None:
        """The advantages whose sign the off-policy mask reads: the term's own for a sequence term, else the
        batch's token advantages (None when the mask is off: nothing to build)."""
        if self.shaping.off_policy_mask_threshold is None:
            return None
        return term.advantages if term.level == "sequence" else batch.token_advantages()

    def kl_ratio(self, batch: TokenBatch, lp: torch.Tensor, level: str) -> torch.Tensor:
        """The ratio r with gradient that ``bias_correction_kl`` multiplies the KL by, when the term brings none:
        the ratio at the config's ``importance_sampling_level`` (token by default), or for a sequence term the row
        mean of the token log-ratios (``[B]``). ``lp``: the masked logprobs with gradient."""
        log_r = importance_log_ratio(batch, lp, getattr(self.config, "importance_sampling_level", "token"))
        if level == "sequence":
            log_r = log_r.sum(-1) / batch.seq_lengths().clamp_min(1.0)
        return ratio(log_r)

    def bias_ratio(self, batch: TokenBatch, term: Term, shaper: Shaper) -> torch.Tensor | None:
        """The ratio for ``bias_correction_kl``: the term's own, else :meth:`kl_ratio`; None when it is off."""
        if not self.shaping.bias_correction_kl:
            return None
        return term.ratio if term.ratio is not None else self.kl_ratio(batch, shaper.lp(), term.level)

    def reduce(self, value: torch.Tensor, batch: TokenBatch, level: str) -> torch.Tensor:
        """The shaped term aggregated to a scalar: row sums through :func:`aggregate_row_sums`, a sequence term by
        ``seq-mean``, a token term by :meth:`aggregation_mode`."""
        if level == "rows":
            return aggregate_row_sums(value, batch, self.aggregation_mode())
        return aggregate(value, batch, "seq-mean" if level == "sequence" else self.aggregation_mode(), clean=True)

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


def raw_advantages(batch: TokenBatch) -> torch.Tensor:
    """The advantages as given, ``[B, 1]`` per sequence or ``[B, T]`` per token, in the logprobs' dtype: garbage on
    fully masked rows and at masked positions included. For a coefficient that is sanitised once afterwards
    (:meth:`~pgzoo.TokenBatch.zero_masked_`): no ``[B, T]`` pass to mask the advantages first."""
    adv = batch.advantages.to(batch.logprobs.dtype)
    return adv[:, None] if adv.dim() == 1 else adv
