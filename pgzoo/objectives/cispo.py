"""CISPO: REINFORCE with a clipped, stop-gradient importance-sampling weight (no token is ever dropped).

MiniMax, "MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning Attention" (arXiv 2506.13585). Per token::

    term = sg(clamp(r, 1 − ε_low, 1 + ε_high)) · A · lp,     r = exp(lp − old)
    loss = −Σ_i Σ_t m·term / N_tok

Defaults ε_low = None (no lower bound), ε_high = 4 (the weight is capped at 5). ∇_lp loss = −clamp(r)·A / N_tok:
unlike PPO clipping, a clipped token keeps a (capped) gradient. An optional training–inference ``correction``
multiplies the term by its stop-gradient weight. ``importance_sampling_level="sequence"`` uses the row's
geometric-mean ratio for r (TRL's option); the loss-shaping options are those of :mod:`pgzoo.objectives.shaping`.
TRL's ``epsilon_high`` for ``cispo`` is the cap itself: TRL ε_high = X is pgzoo ``eps_high = X − 1``.

Reduces to: on-policy (r = 1) token-mean REINFORCE, −Σ A·lp / N_tok; with ε_high = C − 1, ε_low = None and
old = mu it has MiniRL's weight min(r, C) without MiniRL's mask, normalised per token.

Example:
    >>> out = pgzoo.get("cispo")(pgzoo.TokenBatch(logprobs=lp, mask=m, advantages=a, old_logprobs=old))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pgzoo.batch import TokenBatch
from pgzoo.objectives.correction import Correction
from pgzoo.objectives.diagnostics import clip_metrics, policy_metrics, weight_metrics
from pgzoo.objectives.base import Objective, Term, check_aggregation, check_eps, log_bounds, raw_advantages
from pgzoo.objectives.ratios import detached_log_ratio, importance_log_ratio
from pgzoo.objectives.shaping import shaped, check_is_level
from pgzoo.objectives.registry import register


class CISPO(Objective):
    """CISPO (arXiv 2506.13585): sg(clamp(r, 1−ε_low, 1+ε_high))·A·log π_θ, token-mean.

    Config:
        eps_low: lower clip ε_low, or None for no lower bound (default None).
        eps_high: upper clip ε_high (4: weight ≤ 5), or None for no upper bound.
        importance_sampling_level: ``token`` (default) or ``sequence`` (the row's geometric-mean ratio).
        aggregation: ``token-mean`` (or any token-level mode of :func:`pgzoo.aggregate`).
        correction: optional training–inference correction.
        beta, kl, ...: the loss-shaping options of :mod:`pgzoo.objectives.shaping`.
    """

    @shaped
    @dataclass(frozen=True)
    class Config:
        eps_low: float | None = None
        eps_high: float | None = 4.0
        importance_sampling_level: str = "token"
        aggregation: str = "token-mean"
        correction: Correction | None = None

    default_advantage = "group-mean-std"
    paper = "MiniMax-M1 (arXiv 2506.13585)"

    def _check_config(self) -> None:
        c = self.config
        check_eps(type(self).__name__, c.eps_low, c.eps_high, low_optional=True, high_optional=True)
        check_aggregation(type(self).__name__, c.aggregation)
        check_is_level(self.name, c.importance_sampling_level)

    def policy_term(self, batch: TokenBatch) -> Term:
        c = self.config
        if c.importance_sampling_level == "token":
            log_r = detached_log_ratio(batch)  # garbage at masked positions: the coefficient is sanitised once below
            if self.report_metrics:  # the metrics read log r and r − 1: keep clean copies of both
                log_r = batch.zero_masked_(log_r)
        else:
            log_r = importance_log_ratio(batch, batch.masked(batch.logprobs).detach(), "sequence")
        # w = clamp(r) via expm1 (r − 1 is shared with the metrics); an unbounded weight stays finite
        r_minus_one = log_r.clamp(max=40.0) if self.report_metrics else log_r.clamp_(max=40.0)
        r_minus_one.expm1_()
        weight = r_minus_one + 1.0 if self.report_metrics else r_minus_one.add_(1.0)
        weight.clamp_(min=None if c.eps_low is None else 1.0 - c.eps_low,
                      max=None if c.eps_high is None else 1.0 + c.eps_high)
        lp = r = None
        if self.shaping.beta > 0 and c.bias_correction_kl:
            # r with gradient for the KL's bias correction, built before the term: autograd then sums the gradient
            # contributions to lp in one fixed order, the term's last (losses and gradients stay bit-reproducible)
            lp = batch.masked(batch.logprobs)
            r = self.kl_ratio(batch, lp, "token")
        adv = raw_advantages(batch)
        # sg(w)·A, 0 at masked positions (in place unless the metrics read the weight)
        coef = batch.zero_masked_(weight * adv if self.report_metrics else weight.mul_(adv))
        return Term(batch.logprobs_times(coef), lp=lp, ratio=r,
                    saved=dict(log_r=log_r, r_minus_one=r_minus_one, weight=weight))

    def term_metrics(self, batch: TokenBatch, term: Term) -> dict[str, torch.Tensor]:
        c, s, mask = self.config, term.saved, batch.mask
        log_r, r_minus_one = s["log_r"], s["r_minus_one"]
        lo, hi = log_bounds(c.eps_low, c.eps_high)
        low, high = log_r < lo, log_r > hi  # where the weight is clipped (it keeps its gradient path via lp)
        if c.importance_sampling_level == "sequence":  # the staleness metrics stay per token
            low, high = low & mask, high & mask
            log_r = batch.zero_masked_(detached_log_ratio(batch))
            r_minus_one = log_r.clamp(max=40.0).expm1()
        metrics = policy_metrics(batch, log_r, staleness_expm1=r_minus_one)
        metrics.update(clip_metrics(low, high, mask))
        metrics.update(weight_metrics(s["weight"], low | high, mask, batch.mask_float()))
        return metrics


register("cispo", CISPO)
