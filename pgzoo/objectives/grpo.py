"""The PPO-clip surrogate family: GRPO, Dr. GRPO, DAPO, BNPO and LUSPO — one term, five aggregations.

Per token (i, t), with r = exp(lp − old) (or, at ``importance_sampling_level="sequence"``, the row's
r_i = exp(Σ_t m(lp − old)/|y_i|) on every token), A the advantage and ref the reference policy::

    term = min(r·A, clip(r, 1 − ε_low, 1 + ε_high)·A) − β·k3,    k3 = exp(ref − lp) − (ref − lp) − 1

    grpo     loss = −Σ_i (1/|y_i|) Σ_t m·term / N_seq      ε .2/.2, β 0, advantage group-mean-std
    dr-grpo  loss = −Σ_i Σ_t m·term / (N_seq·L)            ε .2/.2,      advantage group-mean
    dapo     loss = −Σ_i Σ_t m·term / N_tok                ε .2/.28,     advantage group-mean-std
    bnpo     loss = −Σ_i Σ_t m·term / N_tok                ε .2/.2,      advantage group-mean-std
    luspo    loss = −Σ_i Σ_t m·term / N_seq, sequence-level r            ε .2/.2 (TRL's defaults)

bnpo and luspo take TRL's defaults, including ``bias_correction_kl=True`` (TRL's ``use_bias_correction_kl``) for
when β > 0; grpo, dr-grpo and dapo keep their papers' plain KL term.

∇_lp term = r·A where the surrogate is unclipped (not (A > 0 and r > 1+ε_high), not (A < 0 and r < 1−ε_low)), 0
where it is clipped, minus β·(1 − exp(ref − lp)) for the KL term. An optional training–inference ``correction``
(:mod:`pgzoo.objectives.correction`) multiplies the policy term by its stop-gradient weight (the KL term too only with
``correct_kl=True``). ``delta`` adds INTELLECT-2's two-sided clip (r capped at δ); the KL estimator, the entropy and
off-policy masks and the entropy bonus are the options of :mod:`pgzoo.objectives.shaping`.

BNPO is TRL's ``bnpo`` loss type: DAPO's token-mean with ε_high = ε_low, normalised by the tokens of the batch it
is given (TRL: the local micro-batch; pass ``num_tokens`` for a global count). LUSPO (Length-Unbiased Sequence Policy
Optimization, arXiv 2602.05261) is GSPO's sequence ratio with each sequence's term scaled by its length |y_i|: the
token sum per sequence; TRL recommends it at sequence level, pgzoo's default.

Dual clip (``clip_c`` = c > 1; Ye et al., "Mastering Complex Control in MOBA Games with Deep Reinforcement
Learning", arXiv 1912.09729, as verl's ``vanilla`` loss applies it): for A < 0 the surrogate is further bounded
below, max(min(r·A, clip(r)·A), c·A), so a token with A < 0 and r > c contributes the constant c·A and no
gradient. ``grpo``, ``dr-grpo`` and ``dapo`` come from TRL, which has no dual clip: their default is
``clip_c=None`` (off). ``dual-clip-ppo`` is verl's ``vanilla`` out of the box: ε 0.2/0.2, c = 3, token-mean.

Papers: GRPO — Shao et al., "DeepSeekMath" (arXiv 2402.03300); Dr. GRPO — Liu et al., "Understanding R1-Zero-Like
Training: A Critical Perspective" (arXiv 2503.20783); DAPO — Yu et al. (arXiv 2503.14476); LUSPO (arXiv 2602.05261).

Reduces to: on-policy with β = 0 all are REINFORCE, −Σ A·lp, differing only in normalisation; with one token
per sequence GRPO equals GSPO at the same ε; ``dapo`` with ε_high = ε_low is ``bnpo``.

Example:
    >>> out = pgzoo.get("grpo", beta=0.04)(pgzoo.TokenBatch(logprobs=lp, mask=m, advantages=a,
    ...                                                    old_logprobs=old, ref_logprobs=ref))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pgzoo.batch import TokenBatch
from pgzoo.objectives.correction import Correction
from pgzoo.objectives.diagnostics import clip_metrics, masked_fraction, policy_metrics
from pgzoo.errors import ConfigError
from pgzoo.objectives.base import (
    ROW_SUM_MODES,
    Objective,
    Term,
    check_aggregation,
    check_eps,
    log_bounds,
    ppo_clip_flags,
)
from pgzoo.objectives.ratios import importance_log_ratio, masked_log_ratio, ratio
from pgzoo.objectives.shaping import shaped, check_is_level
from pgzoo.objectives.registry import register
from pgzoo.validate import check_number


def clipped_surrogate(r: torch.Tensor, adv: torch.Tensor, low: torch.Tensor, high: torch.Tensor,
                      eps_low: float, eps_high: float, dual: torch.Tensor | None = None,
                      clip_c: float | None = None) -> torch.Tensor:
    """min(r·A, clip(r, 1−ε_low, 1+ε_high)·A) given r (with gradient) and the clip flags of ``ppo_clip_flags``.

    Written as "r where kept, the constant bound where clipped" so that a clipped token's gradient is exactly
    zero (never 0·inf) and no elementwise ``torch.minimum`` / ``where`` is needed. With ``dual`` (the flags A < 0
    and r > c) the dual-clip bound c replaces r there: max(min(r·A, clip(r)·A), c·A) for A < 0.
    """
    r_clip = r.detach().clamp(1.0 - eps_low, 1.0 + eps_high)  # on a clipped token r_clip is the bound it crossed
    clipped = low | high
    if dual is not None:
        r_clip.masked_fill_(dual, clip_c)  # dual and low are disjoint (r > c > 1 vs r < 1 − ε_low)
        clipped |= dual
    return (r_clip + (r - r_clip) * ~clipped) * adv


class GRPO(Objective):
    """PPO-clip surrogate with optional KL penalty and loss shaping (GRPO, Dr. GRPO, DAPO, BNPO, LUSPO).

    Config:
        eps_low, eps_high: clip range of r (0.2, 0.2; DAPO 0.2, 0.28).
        delta: two-sided clipping (INTELLECT-2, arXiv 2505.07291): r is also capped at δ, so a token with A < 0
            and r > δ has no gradient; None (default) disables it. Must exceed 1 + ε_high.
        importance_sampling_level: ``token`` (r per token, default) or ``sequence`` (r_i = exp of the row mean of
            lp − old, broadcast over the row's tokens; TRL's ``importance_sampling_level``, LUSPO's default).
        aggregation: ``seq-mean-token-mean`` (grpo), ``constant`` (dr-grpo), ``token-mean`` (dapo, bnpo),
            ``seq-mean-token-sum`` (luspo), or any token-level mode of :func:`pgzoo.aggregate`.
        clip_c: dual-clip bound c > 1 for negative advantages, or None (off; ``dual-clip-ppo``: 3, verl's default);
            exclusive with ``delta`` (both bound r for A < 0).
        correction: optional training–inference correction (None, a Correction, or a dict of its fields).
        beta, kl, kl_clamp, bias_correction_kl, correct_kl, top_entropy_quantile, off_policy_mask_threshold,
            entropy_coef: the loss-shaping options of :mod:`pgzoo.objectives.shaping` (all off by default).
    """

    @shaped
    @dataclass(frozen=True)
    class Config:
        eps_low: float = 0.2
        eps_high: float = 0.2
        delta: float | None = None
        importance_sampling_level: str = "token"
        aggregation: str = "seq-mean-token-mean"
        correction: Correction | None = None
        clip_c: float | None = None

    default_advantage = "group-mean-std"
    paper = "DeepSeekMath (arXiv 2402.03300)"

    def _check_config(self) -> None:
        c = self.config
        check_eps(type(self).__name__, c.eps_low, c.eps_high)
        check_is_level(self.name, c.importance_sampling_level)
        if c.delta is not None and (isinstance(c.delta, bool) or not isinstance(c.delta, (int, float))
                                    or not c.delta > 1.0 + c.eps_high):
            raise ConfigError(f"{self.name}: delta={c.delta!r} must be a number > 1 + eps_high = {1 + c.eps_high} "
                              "(the upper bound of two-sided clipping; INTELLECT-2 uses 4), or None")
        if c.clip_c is not None:
            check_number(f"{self.name}: clip_c", c.clip_c, low=1.0, low_open=True,
                         hint="the dual-clip bound on r for negative advantages; verl uses 3; None disables it")
            if c.delta is not None:
                raise ConfigError(f"{self.name}: clip_c={c.clip_c!r} and delta={c.delta!r} both bound r for negative "
                                  "advantages (verl's dual clip vs INTELLECT-2's two-sided clip); set one to None")
        check_aggregation(self.name, c.aggregation)
        if c.clip_c is not None and (isinstance(c.clip_c, bool) or not isinstance(c.clip_c, (int, float))
                                     or not c.clip_c > 1):
            raise ConfigError(f"{self.name}: clip_c={c.clip_c!r} must be a number > 1 (the dual-clip bound on r "
                              "for negative advantages; verl uses 3) or None (no dual clip)")

    def policy_term(self, batch: TokenBatch) -> Term:
        c = self.config
        if c.importance_sampling_level == "sequence" and self._row_constant(batch):
            return self._row_term(batch)
        adv = batch.token_advantages()
        if c.importance_sampling_level == "token":
            lp = None  # the shaping builds the masked logprobs if an option needs them
            log_r = masked_log_ratio(batch)
        else:
            lp = batch.masked(batch.logprobs)
            log_r = importance_log_ratio(batch, lp, c.importance_sampling_level)
        low, high = ppo_clip_flags(log_r.detach(), adv, *log_bounds(c.eps_low, c.eps_high))
        r = ratio(log_r)
        r_capped = r if c.delta is None else r.clamp(max=c.delta)  # two-sided: no gradient above δ
        dual = None
        if c.clip_c is not None:  # dual clip: A < 0 and r > c contribute the constant c·A
            dual = (adv < 0) & (log_r.detach() > math.log(c.clip_c))
        surrogate = clipped_surrogate(r_capped, adv, low, high, c.eps_low, c.eps_high, dual, c.clip_c)
        # the KL's bias correction takes the uncapped r
        return Term(surrogate, lp=lp, ratio=r,
                    saved=dict(lp=lp, log_r=log_r, r=r, adv=adv, low=low, high=high, dual=dual))

    def term_metrics(self, batch: TokenBatch, term: Term) -> dict[str, torch.Tensor]:
        c, s, mask = self.config, term.saved, batch.mask
        if term.level == "rows":
            metrics = policy_metrics(batch, s["stale"].detach())
            metrics.update(clip_metrics(s["low"][:, None] & mask, s["high"][:, None] & mask, mask))
            if c.delta is not None:
                capped = (s["log_s"].detach() > math.log(c.delta)) & (s["adv"] < 0)
                metrics["clip/delta_fraction"] = masked_fraction(capped[:, None] & mask, mask)
            return metrics
        log_r = s["log_r"].detach()
        if c.importance_sampling_level == "sequence":  # the staleness metrics stay per token
            metrics = policy_metrics(batch, s["lp"].detach() - batch.clean("old_logprobs"))
        else:
            metrics = policy_metrics(batch, log_r, staleness_expm1=s["r"].detach() - 1.0)
        metrics.update(clip_metrics(s["low"], s["high"], mask))
        if s["dual"] is not None:
            metrics["clip/dual_fraction"] = masked_fraction(s["dual"], mask)
        if c.delta is not None:
            metrics["clip/delta_fraction"] = masked_fraction((log_r > math.log(c.delta)) & (s["adv"] < 0), mask)
        return metrics

    def _row_constant(self, batch: TokenBatch) -> bool:
        """At sequence level with [B] advantages and no per-token option, the term is constant along each row."""
        c = self.config
        return (batch.advantages.dim() == 1 and c.beta == 0 and c.correction is None and c.top_entropy_quantile == 1
                and c.off_policy_mask_threshold is None and c.clip_c is None and c.aggregation in ROW_SUM_MODES)

    def _row_term(self, batch: TokenBatch) -> Term:
        """The sequence-level term once per row ([B], not [B, T]); Σ_t m·term_i = |y_i|·term_i. Same loss and
        gradient as the broadcast path (tested against the naive loop and TRL), in a few passes over [B, T]."""
        c = self.config
        lp = batch.logprobs
        old = batch.old_logprobs if batch.old_logprobs is not None else lp.detach()
        # one NaN-safe masking of the difference (not of lp and old separately): lp − old, 0 where masked
        stale = batch.masked(lp - old.to(lp.dtype))
        lengths = batch.seq_lengths()
        log_s = stale.sum(-1) / lengths.clamp_min(1.0)
        adv = torch.where(batch.has_tokens(), batch.advantages.to(lp.dtype), 0.0)
        low, high = ppo_clip_flags(log_s.detach(), adv, *log_bounds(c.eps_low, c.eps_high))
        r = ratio(log_s)
        r_capped = r if c.delta is None else r.clamp(max=c.delta)
        term = clipped_surrogate(r_capped, adv, low, high, c.eps_low, c.eps_high)
        return Term(term * lengths, level="rows", saved=dict(stale=stale, log_s=log_s, adv=adv, low=low, high=high))


register("grpo", GRPO)
register("dr-grpo", GRPO, aggregation="constant", default_advantage="group-mean",
         paper="Understanding R1-Zero-Like Training: A Critical Perspective (arXiv 2503.20783)")
register("dapo", GRPO, eps_high=0.28, aggregation="token-mean",
         paper="DAPO: An Open-Source LLM Reinforcement Learning System at Scale (arXiv 2503.14476)")
register("dual-clip-ppo", GRPO, aggregation="token-mean", clip_c=3.0,
         paper="Mastering Complex Control in MOBA Games with Deep Reinforcement Learning (arXiv 1912.09729)")
register("bnpo", GRPO, aggregation="token-mean", bias_correction_kl=True,
         paper="TRL loss_type 'bnpo': DAPO's token-level normalisation (arXiv 2503.14476) with eps_high = eps_low")
register("luspo", GRPO, importance_sampling_level="sequence", aggregation="seq-mean-token-sum",
         bias_correction_kl=True,
         paper="LUSPO: Length-Unbiased Sequence Policy Optimization (arXiv 2602.05261)")
