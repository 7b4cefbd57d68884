"""MiniRL: REINFORCE with a truncated training–inference importance weight and decoupled-PPO clipping.

"Stabilizing Reinforcement Learning with LLMs: Formulation and Practices" (arXiv 2512.01374),
eqs. 6–7. Per token (i, t), with lp = log π_θ, old = log π_θold, mu = log μ_θold (the inference engine that sampled
y), r = exp(lp − old) and A the advantage::

    objective term  = M_it · w_it · A_it · lp_it
    w_it            = min(sg(exp(lp − mu)), C)               (minirl-no-is: min(sg(r), C))
    M_it            = 0 if A > 0 and r > 1 + ε_high, or A < 0 and r < 1 − ε_low; else 1   (π_θold is proximal)
    loss            = −Σ_i Σ_t m·term / N_seq                 (minirl-length-norm: −Σ_i (1/|y_i|) Σ_t m·term / N_seq)

so ∇_lp loss = −M·w·A / N_seq. The weight exp(lp − mu) = (π_θold/μ_θold)·(π_θ/π_θold) corrects both the
training–inference discrepancy and the staleness; C (``is_cap``, 5) truncates it.

Shapes: ``batch.logprobs``/``rollout_logprobs``/``old_logprobs`` ``[B, T]``; advantages ``[B]`` or ``[B, T]``.

Reduces to: on-policy (old = lp) ``minirl`` is REINFORCE weighted by min(π_θ/μ_θold, C); ``minirl-no-is`` is plain
REINFORCE, −Σ A·lp / N_seq. ``minirl`` *requires* ``rollout_logprobs`` and never substitutes ``old_logprobs``: an
adapter whose sampler is the training engine itself passes them explicitly.

Example:
    >>> out = pgzoo.get("minirl")(pgzoo.TokenBatch(logprobs=lp, mask=m, advantages=a, rollout_logprobs=mu))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pgzoo.batch import TokenBatch
from pgzoo.objectives.diagnostics import clip_metrics, policy_metrics, weight_metrics
from pgzoo.objectives.base import (Objective, Term, check_aggregation, check_eps, log_bounds, ppo_clip_flags,
                                  raw_advantages)
from pgzoo.objectives.ratios import detached_log_ratio
from pgzoo.objectives.registry import register
from pgzoo.objectives.shaping import shaped
from pgzoo.validate import check_number


_MAX_EXP = 40.0  # log-weights are clamped here before the exponential (the weight is capped at C anyway)


class MiniRL(Objective):
    """MiniRL (arXiv 2512.01374): M·min(sg(π_θ/μ_θold), C)·A·log π_θ, summed over tokens, averaged over sequences.

    Config:
        eps_low: ε_low of the mask M (0.2). eps_high: ε_high (0.27).
        is_cap: C, the truncation of the IS weight (5).
        clip: apply the mask M (``minirl-no-clip`` sets False: M ≡ 1).
        train_inference_is: weight by π_θ/μ_θold (True) or only by π_θ/π_θold (``minirl-no-is``).
        aggregation: ``seq-mean-token-sum`` (``minirl-length-norm``: ``seq-mean-token-mean``).
        beta, kl, ...: the loss-shaping options of :mod:`pgzoo.objectives.shaping`, all off by default (the paper's
            objective has no KL term); ``correct_kl`` is refused: MiniRL takes no correction, its weight w is its own.
    """

    @shaped
    @dataclass(frozen=True)
    class Config:
        eps_low: float = 0.2
        eps_high: float = 0.27
        is_cap: float = 5.0
        clip: bool = True
        train_inference_is: bool = True
        aggregation: str = "seq-mean-token-sum"

    default_advantage = "group-mean"
    infinite_ok = frozenset({"is_cap"})  # is_cap = inf: the IS weight is not truncated
    paper = "Stabilizing Reinforcement Learning with LLMs: Formulation and Practices (arXiv 2512.01374)"

    def _check_config(self) -> None:
        c = self.config
        check_eps(type(self).__name__, c.eps_low, c.eps_high)
        check_number(f"{self.name}: is_cap", c.is_cap, low=0.0, low_open=True, finite=False,
                     hint="the paper uses C = 5; inf: no truncation")
        check_aggregation(type(self).__name__, c.aggregation)

    def extra_requires(self) -> frozenset[str]:
        own = frozenset({"rollout_logprobs"}) if self.config.train_inference_is else frozenset()
        return super().extra_requires() | own

    def policy_term(self, batch: TokenBatch) -> Term:
        c, report = self.config, self.report_metrics
        # log-ratios from the raw fields, garbage at masked positions: the coefficient is sanitised once below (the
        # metrics read clean copies)
        log_r = detached_log_ratio(batch)  # staleness log π_θ/π_θold
        log_w = detached_log_ratio(batch, "rollout_logprobs") if c.train_inference_is else log_r
        if report:
            log_r = batch.zero_masked_(log_r)
            log_w = batch.zero_masked_(log_w) if c.train_inference_is else log_r
        adv = raw_advantages(batch)
        low = high = None
        if c.clip:  # before log_w (which may be log_r) is overwritten below
            low, high = ppo_clip_flags(log_r, adv, *log_bounds(c.eps_low, c.eps_high))
        # w = min(exp(log_w), C), via expm1 (shared with the first-order-gap metric); never overflows
        w_minus_one = (log_w.clamp(max=_MAX_EXP) if report else log_w.clamp_(max=_MAX_EXP)).expm1_()
        w = (w_minus_one + 1.0 if report else w_minus_one.add_(1.0)).clamp_(max=c.is_cap)
        coef = w * adv if report else w.mul_(adv)
        if c.clip:
            coef.mul_(~(low | high))  # M: 0 on the clipped side
        coef = batch.zero_masked_(coef)  # M·w·A, exactly 0 at masked positions
        return Term(batch.logprobs_times(coef), saved=dict(log_r=log_r, log_w=log_w, w_minus_one=w_minus_one, w=w,
                                                           low=low, high=high))

    def term_metrics(self, batch: TokenBatch, term: Term) -> dict[str, torch.Tensor]:
        c, s, mask = self.config, term.saved, batch.mask
        low, high = s["low"], s["high"]
        if not c.clip:
            low = high = torch.zeros_like(mask)  # nothing is clipped
        if c.train_inference_is:
            metrics = policy_metrics(batch, s["log_r"], total_log=s["log_w"], total_expm1=s["w_minus_one"])
        else:
            metrics = policy_metrics(batch, s["log_r"], staleness_expm1=s["w_minus_one"])
        metrics.update(clip_metrics(low, high, mask))
        metrics.update(weight_metrics(s["w"], s["log_w"] > math.log(c.is_cap), mask, batch.mask_float()))
        return metrics


register("minirl", MiniRL)
register("minirl-no-clip", MiniRL, clip=False)
register("minirl-length-norm", MiniRL, aggregation="seq-mean-token-mean")
register("minirl-no-is", MiniRL, train_inference_is=False)
