"""Loss-shaping options every objective takes: a KL penalty with a choice of estimator, the high-entropy token mask,
the off-policy sequence mask and an entropy bonus — the switches TRL's ``GRPOConfig`` and verl's actor config put
around the policy loss. :meth:`pgzoo.Objective.compute` applies them, once, to every family's term.

With p_it the objective's policy term (e.g. the clipped surrogate), c_it an optional training–inference correction
weight (:mod:`pgzoo.objectives.correction`), and r_it the objective's importance ratio (token or sequence level)::

    term_it = E_it · O_it · c_it · p_it  −  β · KL_it · (r_it if bias_correction_kl) · (c_it if correct_kl)
    loss    = −aggregate(term)  −  entropy_coef · Σ_it m'·H_it / N'

- ``kl``: the estimator of KL(π_θ‖π_ref) per token, d = ref − lp (Schulman, "Approximating KL divergence", 2020):
  ``k1`` = −d; ``k2`` = d²/2; ``k3`` = e^d − d − 1 (TRL's, and pgzoo's default); ``low-var-k3`` = k3 clamped to
  [−10, 10], verl's ``low_var_kl``. ``kl_clamp`` clamps any estimator's value to [−kl_clamp, kl_clamp] (verl clamps
  ``low_var_kl`` at 10). d is clamped to ±20 before the exponential, as verl does. ``abs`` = |d| (verl's ``abs``, a
  penalty rather than an estimate: its mean is not the KL). The straight-through forms ``k1+``, ``k3+`` and
  ``low-var-k3+`` (verl's ``k1+``, ``k3+``, ``low_var_kl+``) take their value from the estimator before the ``+``
  and their gradient from k2 = d²/2: k2's gradient (lp − ref) is the unbiased gradient of KL(π_θ‖π_ref) on
  samples of π_θ, which those of k1 (the constant 1) and k3 are not. ``kl_clamp`` clamps the value only; the k2
  gradient is taken on the unclamped d, as verl's ``kl_penalty`` does. verl's ``k3`` is clamped at 10 like its
  ``low_var_kl``, so verl's ``k3+`` is pgzoo's ``low-var-k3+`` (pgzoo's ``k3+`` has the unclamped k3 value).
- ``bias_correction_kl`` (TRL's ``use_bias_correction_kl``, DeepSeek-V3.2, arXiv 2512.02556): the KL term is
  multiplied by the ratio r (with gradient), making its gradient the unbiased reverse-KL gradient off-policy.
- ``correct_kl``: the training–inference correction weight c also multiplies the KL term. Default False: TRL and
  verl weight only the policy term, w·surrogate + β·KL (the KL regularises π_θ towards π_ref on the sampled tokens
  whatever engine sampled them); True is pgzoo's earlier convention, w·(surrogate − β·KL).
- ``top_entropy_quantile`` ρ (Wang et al., "Beyond the 80/20 Rule", arXiv 2506.01939): E_it = 1 for the tokens
  whose entropy H_it is at least the (1 − ρ)-quantile of the batch's unmasked entropies, else 0 (ρ = 1 keeps all;
  needs ``TokenBatch.entropies``). The quantile is over this batch: under data parallelism TRL takes it over every
  process's tokens, pgzoo over the shard it is given.
- ``off_policy_mask_threshold`` δ (DeepSeek-V3.2, eq. 9): O_it = 0 when A_it < 0 and the sequence's mean
  Σ_t m(mu − lp)/|y_i| > δ, with mu the sampler's logprobs (``rollout_logprobs``, else ``old_logprobs``), as TRL.
- ``entropy_coef``: an entropy bonus, the mean entropy over the kept tokens m' = m·E, subtracted from the loss.
  N' is the number of kept tokens, scaled to the batch's token normaliser (N' = N_tok · Σm'/Σm), so that shards
  under global normalisers add up; with this batch's own counts N' = Σm' exactly (TRL's).

Every option is off by default. On a sequence-level term p_i (``gspo``, ``gmpo``) the KL enters as the row's mean
Σ_t m·KL_it/|y_i| (r and c per sequence) and the off-policy mask per sequence (with the term's own advantage A_i);
the entropy mask is refused there (no token term to drop), as is ``correct_kl`` on an objective without a
``correction`` (MiniRL).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from pgzoo.batch import TokenBatch
from pgzoo.errors import BatchError, ConfigError
from pgzoo.objectives.diagnostics import masked_fraction, masked_mean
from pgzoo.objectives.ratios import MAX_LOG_RATIO
from pgzoo.validate import check_number

KL_ESTIMATORS = ("k1", "k2", "k3", "low-var-k3", "abs", "k1+", "k3+", "low-var-k3+")
IS_LEVELS = ("token", "sequence")
LOW_VAR_KL_CLAMP = 10.0  # verl's clamp of low_var_kl


@dataclass(frozen=True)
class Shaping:
    """The shaping fields an objective's ``Config`` takes through :func:`shaped` (meanings: module docstring)."""

    beta: float = 0.0
    kl: str = "k3"
    kl_clamp: float | None = None
    bias_correction_kl: bool = False
    correct_kl: bool = False
    top_entropy_quantile: float = 1.0
    off_policy_mask_threshold: float | None = None
    entropy_coef: float = 0.0


def shaped(cls: type) -> type:
    """Class decorator: the frozen dataclass ``cls`` with :class:`Shaping`'s fields appended after its own (so
    ``repr`` and ``pgzoo objectives`` show the objective's own parameters first). A shaping field ``cls`` declares
    itself keeps its place among the shaping fields with ``cls``'s default (e.g. ``bias_correction_kl=True``)."""
    own = {f.name: f for f in dataclasses.fields(cls)}
    shaping = {f.name for f in dataclasses.fields(Shaping)}
    specs = [(f.name, f.type, dataclasses.field(default=f.default)) for f in own.values() if f.name not in shaping]
    for f in dataclasses.fields(Shaping):
        default = own[f.name].default if f.name in own else f.default
        specs.append((f.name, f.type, dataclasses.field(default=default)))
    new = dataclasses.make_dataclass(cls.__name__, specs, frozen=True)
    new.__qualname__, new.__module__, new.__doc__ = cls.__qualname__, cls.__module__, cls.__doc__
    return new


def check_shaping(owner: str, c: Shaping) -> None:
    """Validate the shaping fields of config ``c``, raising ConfigError naming the key and the fix."""
    check_number(f"{owner}: beta", c.beta, low=0.0, hint="0 disables the KL term")
    if c.kl not in KL_ESTIMATORS:
        raise ConfigError(f"{owner}: kl={c.kl!r} is not one of {', '.join(KL_ESTIMATORS)}")
    check_number(f"{owner}: kl_clamp", c.kl_clamp, low=0.0, low_open=True, optional=True)
    for key in ("bias_correction_kl", "correct_kl"):
        if not isinstance(getattr(c, key), bool):
            raise ConfigError(f"{owner}: {key}={getattr(c, key)!r} must be True or False")
    check_number(f"{owner}: top_entropy_quantile", c.top_entropy_quantile, low=0.0, high=1.0,
                 hint="1 keeps every token; the paper recommends 0.2")
    check_number(f"{owner}: off_policy_mask_threshold", c.off_policy_mask_threshold, low=0.0, optional=True,
                 hint="DeepSeek-V3.2 uses e.g. 0.5")
    check_number(f"{owner}: entropy_coef", c.entropy_coef, hint="0 disables the bonus")


def check_is_level(owner: str, level) -> None:
    if level not in IS_LEVELS:
        raise ConfigError(f"{owner}: importance_sampling_level={level!r} is not one of {', '.join(IS_LEVELS)}")


def shaping_requires(c: Shaping) -> set[str]:
    """TokenBatch fields the shaping options need."""
    extra = set()
    if c.beta > 0:
        extra.add("ref_logprobs")
    if c.top_entropy_quantile < 1.0 or c.entropy_coef != 0:
        extra.add("entropies")
    return extra


def kl_estimate(lp: torch.Tensor, ref: torch.Tensor, estimator: str, clamp: float | None) -> torch.Tensor:
    """The per-token KL(π_θ‖π_ref) estimate (with gradient through ``lp``); see the module docstring."""
    base = estimator.removesuffix("+")
    d = (ref - lp).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    if base == "k1":
        kl = -d
    elif base == "k2":
        kl = 0.5 * d.square()
    elif base == "abs":
        kl = d.abs()
    else:
        kl = torch.expm1(d) - d
        if base == "low-var-k3" and clamp is None:
            clamp = LOW_VAR_KL_CLAMP
    kl = kl if clamp is None else kl.clamp(-clamp, clamp)
    if base == estimator:
        return kl
    # straight-through: the value of the estimator, the gradient of k2 (unclamped, as verl's kl_penalty)
    k2 = 0.5 * (lp - ref).square()
    return k2 - k2.detach() + kl.detach()


def entropy_mask(batch: TokenBatch, quantile: float) -> torch.Tensor:
    """``[B, T]`` bool: unmasked tokens whose entropy is ≥ the (1 − ρ)-quantile of the unmasked entropies (no host
    sync: masked entries become NaN and ``nanquantile`` skips them)."""
    ent = batch.entropies.detach()
    values = torch.where(batch.mask, ent, torch.nan).reshape(-1)
    threshold = torch.nanquantile(values, 1.0 - quantile)
    return (torch.where(batch.mask, ent, -torch.inf) >= threshold) & batch.mask


def off_policy_mask(batch: TokenBatch, lp: torch.Tensor, adv: torch.Tensor, threshold: float) -> torch.Tensor:
    """Keep-mask, False where A < 0 and the row's mean (mu − lp) exceeds ``threshold``: ``[B, T]`` for token
    advantages ``adv`` ``[B, T]``, ``[B]`` for the advantages ``[B]`` of a sequence-level term."""
    sampler = batch.clean("rollout_logprobs") if batch.rollout_logprobs is not None else batch.clean("old_logprobs")
    seq_kl = (sampler - lp.detach()).sum(-1, keepdim=True) / batch.seq_lengths().clamp_min(1.0)[:, None]
    if adv.dim() == 1:
        seq_kl = seq_kl[:, 0]
    return (adv >= 0) | (seq_kl <= threshold)


def is_shaped(config) -> bool:
    """Whether ``config`` carries every :class:`Shaping` field (every built-in objective's does)."""
    return all(hasattr(config, f.name) for f in dataclasses.fields(Shaping))


NO_SHAPING = Shaping()  # the options of a config without shaping fields: all off


class Shaper:
    """Applies a config's shaping options to one batch's policy term p (see the module docstring).

    ``policy`` multiplies p by the masks and the correction weight, ``total`` subtracts the KL term, ``bonus``
    subtracts the entropy bonus from the loss; metrics collect in ``metrics``. The term's level decides the shapes:
    ``token`` p ``[B, T]``; ``sequence`` one p_i per sequence ``[B]`` (the KL enters as the row's mean
    Σ_t m·KL_it/|y_i|, the off-policy mask per sequence); ``rows`` Σ_t m·p_it per row ``[B]`` (the KL as its row
    sum; masks never reach a row sum: objectives build one only with the masks off).
    """

    def __init__(self, c: Shaping, batch: TokenBatch, lp: torch.Tensor | None, report: bool):
        self.c, self.batch, self.report = c, batch, report
        self._lp = lp
        self.metrics: dict[str, torch.Tensor] = {}
        self.kept = None
        if c.top_entropy_quantile < 1.0:
            self.kept = entropy_mask(batch, c.top_entropy_quantile)
            if report:
                self.metrics["shaping/entropy_kept_fraction"] = masked_fraction(self.kept, batch.mask)

    def lp(self) -> torch.Tensor:
        """The masked logprobs with gradient (the objective's own when it passed them: no second masking pass)."""
        if self._lp is None:
            self._lp = self.batch.masked(self.batch.logprobs)
        return self._lp

    def keep(self, adv: torch.Tensor) -> torch.Tensor | None:
        """E·O: the entropy mask and the off-policy mask (None when both are off); ``[B]`` for a sequence term."""
        c, batch = self.c, self.batch
        keep = self.kept
        if c.off_policy_mask_threshold is not None:
            opm = off_policy_mask(batch, self.lp(), adv, c.off_policy_mask_threshold)
            keep = opm if keep is None else keep & opm
            if self.report:
                masked = ~opm if opm.dim() == 2 else (~opm)[:, None].expand_as(batch.mask)
                self.metrics["shaping/off_policy_masked_fraction"] = masked_fraction(masked, batch.mask)
        return keep

    def policy(self, term: torch.Tensor, adv: torch.Tensor, correction: torch.Tensor | None = None) -> torch.Tensor:
        """E·O·c·p: the masks (and the correction weight, if any) on the policy term. ``adv``: the advantages the
        off-policy mask reads, shaped like the term."""
        keep = self.keep(adv)
        if keep is not None:
            term = term * keep
        if correction is not None:
            term = correction * term
        return term

    def kl_penalty(self, ratio: torch.Tensor | None, correction: torch.Tensor | None) -> torch.Tensor:
        """β·m·KL ``[B, T]``, times ``ratio`` under bias_correction_kl and ``correction`` under correct_kl (both
        ``[B, T]`` or ``[B, 1]``)."""
        c = self.c
        kl = kl_estimate(self.lp(), self.batch.clean("ref_logprobs"), c.kl, c.kl_clamp)
        if self.report:
            # a straight-through form reports its value, which is the base estimator's: the base name
            self.metrics["kl/ref_" + c.kl.removesuffix("+").replace("-", "_")] = masked_mean(kl, self.batch.mask)
        if c.bias_correction_kl:
            kl = kl * ratio
        if c.correct_kl and correction is not None:
            kl = kl * correction
        return c.beta * self.batch.masked(kl)

    def total(self, policy: torch.Tensor, level: str, ratio: torch.Tensor | None = None,
              correction: torch.Tensor | None = None) -> torch.Tensor:
        """policy − β·KL at the term's level (the KL weighted by ``ratio`` under bias_correction_kl, by
        ``correction`` under correct_kl; for a sequence term both are ``[B]``)."""
        if self.c.beta == 0:
            return policy
        if level == "sequence":
            ratio = None if ratio is None else ratio[:, None]
            correction = None if correction is None else correction[:, None]
        penalty = self.kl_penalty(ratio, correction)
        if level == "token":
            return policy - penalty
        if level == "rows":
            return policy - penalty.sum(-1)
        return policy - penalty.sum(-1) / self.batch.seq_lengths().clamp_min(1.0)

    def bonus(self, loss: torch.Tensor) -> torch.Tensor:
        """loss − entropy_coef · (mean entropy over the kept tokens)."""
        c, batch = self.c, self.batch
        if c.entropy_coef == 0:
            return loss
        if batch.logprobs.requires_grad and not batch.entropies.requires_grad:
            raise BatchError("entropies", f"carry no gradient, so entropy_coef={c.entropy_coef} would change the "
                             "loss but not the update", "compute the entropies with gradient (TRL's forward does; "
                             "pgzoo.models.logprobs returns them detached), or set entropy_coef=0")
        ent = batch.masked(batch.entropies)
        count = batch.token_count()
        count = count if isinstance(count, torch.Tensor) else torch.tensor(float(count), dtype=ent.dtype)
        if self.kept is not None:
            kept = self.kept.to(ent.dtype)
            ent = ent * kept
            count = count * kept.sum() / batch.local_token_count().clamp_min(1.0)
        mean_ent = ent.sum() / count.to(ent).clamp_min(1e-12)
        if self.report:
            self.metrics["shaping/entropy_bonus"] = mean_ent.detach().float()  # metrics are float32, as in diagnostics
        return loss - c.entropy_coef * mean_ent
