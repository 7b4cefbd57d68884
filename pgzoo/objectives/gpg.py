"""GPG: plain policy gradient, no ratio, no clip, no KL — the surrogate is A·log π_θ.

Chu et al., "GPG: A Simple and Strong Reinforcement Learning Baseline for Model Reasoning" (arXiv 2504.02546),
as verl 0.9.1 implements it (``policy_loss.loss_mode=gpg``). Per token::

    term = A · lp
    loss = −Σ_i Σ_t m·term / N_tok          (``aggregation``: verl's ``loss_agg_mode``, default token-mean)

∇_lp loss = −A·m / N_tok, whatever ``old_logprobs`` are: GPG ignores staleness by construction (it takes one
update per batch). GPG's own advantage (group-mean baseline, rescaled by the share of groups with a non-zero
spread) is an advantage estimator, not part of the loss: ``pgzoo.advantages`` ``gpg``, the default here. An optional
training–inference ``correction`` multiplies the term by its stop-gradient weight (verl's ``rollout_is_weights``).

Shapes: ``logprobs`` ``[B, T]``; advantages ``[B]`` or ``[B, T]``.

Reduces to: REINFORCE with token-mean normalisation; on-policy it has the gradient of ``dapo`` and ``cispo``.

Example:
    >>> out = pgzoo.get("gpg")(pgzoo.TokenBatch(logprobs=lp, mask=m, advantages=a))
"""

from __future__ import annotations

from dataclasses import dataclass

from pgzoo.batch import TokenBatch
from pgzoo.objectives.correction import Correction
from pgzoo.objectives.diagnostics import policy_metrics
import torch

from pgzoo.objectives.base import Objective, Term, advantage_factor, check_aggregation
from pgzoo.objectives.registry import register
from pgzoo.objectives.shaping import shaped


class GPG(Objective):
    """GPG (arXiv 2504.02546): A·log π_θ, token-mean.

    Config:
        aggregation: ``token-mean`` (verl's default ``loss_agg_mode``), or any token-level mode of
            :func:`pgzoo.aggregate`.
        correction: optional training–inference correction.
        beta, kl, ...: the loss-shaping options of :mod:`pgzoo.objectives.shaping` (all off by default).
    """

    @shaped
    @dataclass(frozen=True)
    class Config:
        aggregation: str = "token-mean"
        correction: Correction | None = None

    default_advantage = "gpg"
    paper = "GPG: A Simple and Strong Reinforcement Learning Baseline for Model Reasoning (arXiv 2504.02546)"

    def _check_config(self) -> None:
        check_aggregation(type(self).__name__, self.config.aggregation)

    def policy_term(self, batch: TokenBatch) -> Term:
        adv = advantage_factor(batch)  # [B, 1], or [B, T] already 0 at masked positions
        coef = adv * batch.mask_float() if adv.shape[1] == 1 else adv
        return Term(batch.logprobs_times(coef))

    def term_metrics(self, batch: TokenBatch, term: Term) -> dict[str, torch.Tensor]:
        return policy_metrics(batch)  # ratio and staleness: GPG ignores them, a user still wants to see them


register("gpg", GPG)
