"""TOPR: tapered off-policy REINFORCE — plain REINFORCE on the positive examples, a truncated importance weight on
the negative ones.

Le Roux et al., "Tapered Off-Policy REINFORCE: Stable and efficient reinforcement learning for LLMs"
(arXiv 2503.14286), eq. 8, as ROLL implements it (``pg_variant: topr``, its agentic actor worker). Per token, with
r = exp(lp − old)::

    term = w₊ · A · lp                          where A > 0   (an SFT-like update: no importance weight)
    term = w₋ · sg(min(r, 1)) · A · lp          where A ≤ 0   (the weight truncated to [0, 1])
    loss = −Σ_i Σ_t m·term / N_seq              (``aggregation``, default ``seq-mean-token-sum``, ROLL's TOPR example)

Defaults are ROLL's: ``positive_weight`` w₊ = 1, ``negative_weight`` w₋ = 1 (``topr_positive_weight``,
``topr_negative_weight``). ∇_lp loss = −w·A·m / N_seq with w = w₊ or w₋·min(r, 1): the negative examples of a
sample that the current policy already makes less likely than the sampler did are down-weighted, never up-weighted,
which is what keeps the off-policy update stable without a baseline.

Differences from the origin, deliberate:
- ROLL splits a sequence into the positive or negative set by its episode *score* (score > 0); a TokenBatch carries
  advantages, not scores, so pgzoo splits by the sign of the advantage (per token when advantages are ``[B, T]``).
  The two agree when the advantages are the rewards (the paper's baseline-free setting) and whenever the baseline
  keeps each reward's sign.
- The paper's weight is the trajectory ratio π(τ)/μ(τ); ROLL's, and pgzoo's, is the per-token ratio.

An optional training–inference ``correction`` multiplies the term by its stop-gradient weight (ROLL's
``train_infer_is_weight``); the loss-shaping options are those of :mod:`pgzoo.objectives.shaping`.

Reduces to: on policy (r = 1) with w₊ = w₋ = 1, REINFORCE summed per sequence, −Σ A·lp / N_seq (``gpg`` with
``seq-mean-token-sum``); with every advantage positive, SFT on the samples weighted by A.

Example:
    >>> out = pgzoo.get("topr")(pgzoo.TokenBatch(logprobs=lp, mask=m, advantages=a, old_logprobs=old))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pgzoo.batch import TokenBatch
from pgzoo.objectives.base import Objective, Term, check_aggregation, raw_advantages
from pgzoo.objectives.correction import Correction
from pgzoo.objectives.diagnostics import masked_fraction, policy_metrics, weight_metrics
from pgzoo.objectives.ratios import detached_log_ratio
from pgzoo.objectives.registry import register
from pgzoo.objectives.shaping import shaped
from pgzoo.validate import check_number


class TOPR(Objective):
    """TOPR (arXiv 2503.14286): REINFORCE on A > 0, sg(min(r, 1))-weighted REINFORCE on A ≤ 0.

    Config:
        positive_weight: w₊, the weight of the positive examples (ROLL's ``topr_positive_weight``, 1).
        negative_weight: w₋, the weight of the negative examples (ROLL's ``topr_negative_weight``, 1).
        aggregation: ``seq-mean-token-sum`` (ROLL's TOPR example), or any token-level mode of
            :func:`pgzoo.aggregate`.
        correction: optional training–inference correction.
        beta, kl, ...: the loss-shaping options of :mod:`pgzoo.objectives.shaping` (all off by default).
    """

    @shaped
    @dataclass(frozen=True)
    class Config:
        positive_weight: float = 1.0
        negative_weight: float = 1.0
        aggregation: str = "seq-mean-token-sum"
        correction: Correction | None = None

    default_advantage = "group-mean"
    paper = "Tapered Off-Policy REINFORCE: Stable and efficient reinforcement learning for LLMs (arXiv 2503.14286)"

    def _check_config(self) -> None:
        c = self.config
        for key in ("positive_weight", "negative_weight"):
            check_number(f"{self.name}: {key}", getattr(c, key), low=0.0,
                         hint="ROLL's default is 1; 0 drops that set of examples")
        check_aggregation(self.name, c.aggregation)

    def policy_term(self, batch: TokenBatch) -> Term:
        c, report = self.config, self.report_metrics
        log_r = detached_log_ratio(batch)  # garbage at masked positions: the coefficient is sanitised once below
        if report:  # the metrics read a clean log r
            log_r = batch.zero_masked_(log_r)
        adv = raw_advantages(batch)
        negative = adv <= 0  # [B, 1] per sequence
        # min(r, 1) = exp(min(log r, 0)): formed in log space, so it never overflows whatever the drift
        tapered = (log_r.clamp(max=0.0) if report else log_r.clamp_(max=0.0)).exp_()
        # w₋·min(r, 1) on the negative examples, w₊ on the positive: w₋·tapered·n + w₊·(1 − n) with n the 0/1 flag,
        # by arithmetic (a select over [B, T] costs several passes on CPU); exact, as one of the two terms is 0
        n = negative.to(adv.dtype)
        weight = (tapered * (c.negative_weight * n) if report else tapered.mul_(c.negative_weight * n))
        weight.add_(c.positive_weight * (1.0 - n))
        coef = batch.zero_masked_(weight.mul_(adv))
        return Term(batch.logprobs_times(coef), saved=dict(log_r=log_r, tapered=tapered, negative=negative))

    def term_metrics(self, batch: TokenBatch, term: Term) -> dict[str, torch.Tensor]:
        s, mask = term.saved, batch.mask
        negative = s["negative"] & mask
        truncated = negative & (s["log_r"] > 0)  # r > 1 on a negative example: the weight was cut to 1
        # the importance weight each token's gradient carries: 1 on the positive examples, min(r, 1) on the negative
        weight = torch.where(negative, s["tapered"], 1.0)
        metrics = policy_metrics(batch, s["log_r"])
        metrics.update(weight_metrics(weight, truncated, mask))
        metrics["topr/negative_fraction"] = masked_fraction(negative, mask)
        return metrics


register("topr", TOPR)
