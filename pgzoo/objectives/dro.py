"""DRO as verl implements it (Kimi k1.5's loss in ROLL): REINFORCE with a quadratic penalty on the log-ratio.

verl 0.9.1's ``policy_loss.loss_mode=dro`` (``compute_policy_loss_dro``), after Direct Reward Optimization
(Richemond et al., "Offline Regularised Reinforcement Learning for Large Language Models Alignment",
arXiv 2405.19107); ROLL's ``pg_variant: kimi15`` is the same loss, from Kimi k1.5 (arXiv 2501.12599, eq. 3). Per
token, with lr = lp − old::

    term = A · lp − ½ · τ · lr²
    loss = −Σ_i Σ_t m·term / N_tok          (``aggregation``: verl's ``loss_agg_mode``, default token-mean)

∇_lp loss = −(A − τ·lr)·m / N_tok: the advantage pulls, the penalty pulls back towards π_θold in proportion to how
far the token has moved — a soft trust region instead of PPO's clip. Default τ = 0.1, ROLL's ``kimi15_tau``; verl has
no default (``dro_beta`` must be set > 0), and τ here is its ``dro_beta``. The penalty's gradient needs no
exponential, so nothing is clamped. An optional training–inference ``correction`` multiplies the whole term (verl's
``rollout_is_weights`` do, penalty included).

Reduces to: on policy (lr = 0) ``gpg``'s gradient, −A·m / N_tok; with τ → 0, ``gpg``.

Example:
    >>> out = pgzoo.get("dro", tau=0.05)(pgzoo.TokenBatch(logprobs=lp, mask=m, advantages=a, old_logprobs=old))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pgzoo.batch import TokenBatch
from pgzoo.objectives.base import Objective, Term, advantage_factor, check_aggregation, raw_advantages
from pgzoo.objectives.correction import Correction
from pgzoo.objectives.diagnostics import masked_mean, policy_metrics
from pgzoo.objectives.ratios import detached_log_ratio
from pgzoo.objectives.registry import register
from pgzoo.objectives.shaping import shaped
from pgzoo.validate import check_number


class DRO(Objective):
    """verl's ``dro`` / ROLL's ``kimi15``: A·lp − ½·τ·(lp − old)², token-mean.

    Config:
        tau: τ > 0, the coefficient of the squared log-ratio penalty (verl's ``dro_beta``, ROLL's ``kimi15_tau``;
            default 0.1, ROLL's).
        aggregation: ``token-mean`` (verl's default ``loss_agg_mode``), or any token-level mode of
            :func:`pgzoo.aggregate`.
        correction: optional training–inference correction.
        beta, kl, ...: the loss-shaping options of :mod:`pgzoo.objectives.shaping` (all off by default).
    """

    @shaped
    @dataclass(frozen=True)
    class Config:
        tau: float = 0.1
        aggregation: str = "token-mean"
        correction: Correction | None = None

    default_advantage = "group-mean-std"
    paper = ("Offline Regularised Reinforcement Learning for Large Language Models Alignment (arXiv 2405.19107); "
             "Kimi k1.5 (arXiv 2501.12599)")

    def _check_config(self) -> None:
        check_number(f"{self.name}: tau", self.config.tau, low=0.0, low_open=True,
                     hint="verl requires dro_beta > 0; ROLL's kimi15_tau is 0.1; tau → 0 is gpg")
        check_aggregation(self.name, self.config.aggregation)

    def policy_term(self, batch: TokenBatch) -> Term:
        lp = batch.logprobs
        old = lp.detach() if batch.old_logprobs is None else batch.old_logprobs.detach().to(lp.dtype)
        if torch.compiler.is_compiling():  # the selects fuse into their consumers
            log_r = batch.masked(lp - old)
            return Term(batch.masked(advantage_factor(batch) * lp) - (0.5 * self.config.tau) * log_r.square())
        return Term(_DROTerm.apply(lp, old, raw_advantages(batch), batch.mask_float(), 0.5 * self.config.tau))

    def term_metrics(self, batch: TokenBatch, term: Term) -> dict[str, torch.Tensor]:
        log_r = batch.zero_masked_(detached_log_ratio(batch))
        metrics = policy_metrics(batch, log_r)
        metrics["log_ratio/staleness_sq_mean"] = masked_mean(log_r.square(), batch.mask)
        return metrics


class _DROTerm(torch.autograd.Function):
    """m·(A·lp − h·(lp − old)²) with h = τ/2, from the raw fields, non-finite values at masked positions zeroed;
    ∂/∂lp = m·(A − 2h·(lp − old)), kept from the forward: the term in four passes over the batch instead of a dozen
    (one masking per field, the square's and the products' backwards)."""

    @staticmethod
    def forward(ctx, lp, old, adv, mask, half_tau):
        log_r = torch.sub(lp, old)
        term = torch.mul(lp, adv).sub_(log_r.square().mul_(half_tau)).mul_(mask).nan_to_num_(0.0, 0.0, 0.0)
        slope = log_r.mul_(-2.0 * half_tau).add_(adv).mul_(mask).nan_to_num_(0.0, 0.0, 0.0)
        ctx.save_for_backward(slope)
        return term

    @staticmethod
    def backward(ctx, grad):
        (slope,) = ctx.saved_tensors
        return grad * slope, None, None, None, None


register("dro", DRO)
register("kimi15", DRO)
