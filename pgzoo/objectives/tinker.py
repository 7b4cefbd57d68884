"""The loss names several training services share: ``importance_sampling`` and ``cross_entropy``.

Tinker's ``forward_backward(data, loss_fn=...)`` takes these names, and SkyRL registers the same two policy losses
(``importance_sampling_loss`` and ``cross_entropy_loss`` in ``skyrl/backends/skyrl_train/utils/ppo_utils.py``) so that
its backend serves that interface. Both *sum* over tokens: neither normalises (Tinker's docs: the loss is
``-(prob_ratio * advantages).sum()``; a caller who wants a mean scales the advantages or weights, as SkyRL's
``apply_loss_reduction_to_advantages_minibatch`` does). Per token, r = exp(lp − old)::

    importance-sampling   term = r · A                 loss = −Σ_i Σ_t m·term      (``token-sum``)
    cross-entropy         term = lp                    loss = −Σ_i Σ_t m·lp        (``token-sum``; A is not read)

``importance-sampling`` is the unclipped importance-sampled policy gradient, ∇_lp loss = −r·A·m: REINFORCE
corrected for sampling from a policy other than π_θ. Tinker's ``logprobs`` input is the sampler's log-probability,
its only behaviour policy: it is pgzoo's ``old_logprobs`` (SkyRL's ``old_log_probs``); pgzoo's ``correction`` adds a
separate training–inference weight when a trainer has both. ``cross-entropy`` is supervised fine-tuning (the
negative log-likelihood of the unmasked tokens); Tinker's per-token ``weights`` are pgzoo's ``mask`` where they are
0 or 1 (real-valued weights w are ``gpg`` with advantages w and ``aggregation="token-sum"``).

Numerical choice: r's log is clamped at ±20 as every pgzoo ratio with gradient (Tinker and SkyRL exponentiate
unclamped, overflowing in float32 beyond that). Every token-level ``aggregation`` is available; the default is the
services' sum, so under data parallelism pgzoo's Lightning adapter (which sums gradients over ranks) reproduces
the services' total.

Reduces to: ``importance-sampling`` on policy is REINFORCE summed over tokens; ``cross-entropy`` is
``importance-sampling``'s gradient on policy with every advantage 1.

Example:
    >>> out = pgzoo.get("importance_sampling")(pgzoo.TokenBatch(logprobs=lp, mask=m, advantages=a, old_logprobs=q))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pgzoo.batch import TokenBatch
from pgzoo.objectives.base import Objective, Term, check_aggregation
from pgzoo.objectives.correction import Correction
from pgzoo.objectives.diagnostics import masked_mean, policy_metrics
from pgzoo.objectives.ratios import detached_log_ratio, ratio, weighted_ratio
from pgzoo.objectives.registry import register
from pgzoo.objectives.shaping import shaped

SERVICES = "Tinker's and SkyRL's loss_fn"


class ImportanceSampling(Objective):
    """The services' ``importance_sampling``: r·A with r = exp(lp − old) carrying the gradient, summed.

    Config:
        aggregation: ``token-sum`` (the services' sum), or any token-level mode of :func:`pgzoo.aggregate`.
        correction: optional training–inference correction.
        beta, kl, ...: the loss-shaping options of :mod:`pgzoo.objectives.shaping` (all off by default).
    """

    @shaped
    @dataclass(frozen=True)
    class Config:
        aggregation: str = "token-sum"
        correction: Correction | None = None

    default_advantage = "group-mean"
    paper = f"{SERVICES} 'importance_sampling' (importance-sampled REINFORCE)"

    def _check_config(self) -> None:
        check_aggregation(self.name, self.config.aggregation)

    def policy_term(self, batch: TokenBatch) -> Term:
        # r·A in one autograd function from the raw fields (A·m sanitised once); the KL's bias correction, when on,
        # builds its own r (Objective.kl_ratio)
        return Term(weighted_ratio(batch, batch.token_advantages()))

    def term_metrics(self, batch: TokenBatch, term: Term) -> dict[str, torch.Tensor]:
        log_r = batch.zero_masked_(detached_log_ratio(batch))
        return policy_metrics(batch, log_r, staleness_expm1=ratio(log_r) - 1.0)


class CrossEntropy(Objective):
    """The services' ``cross_entropy``: the negative log-likelihood of the unmasked tokens, summed (SFT).

    Advantages are not read (a TokenBatch still carries them; any value works). Config: ``aggregation``
    (``token-sum``; ``token-mean`` is the usual mean NLL), ``correction``, and the loss-shaping options.
    """

    @shaped
    @dataclass(frozen=True)
    class Config:
        aggregation: str = "token-sum"
        correction: Correction | None = None

    default_advantage = "reward"
    paper = f"{SERVICES} 'cross_entropy' (supervised fine-tuning)"

    def _check_config(self) -> None:
        check_aggregation(self.name, self.config.aggregation)

    def policy_term(self, batch: TokenBatch) -> Term:
        lp = batch.masked(batch.logprobs)
        return Term(lp, lp=lp)  # the NLL term is the masked logprobs themselves: one pass

    def term_metrics(self, batch: TokenBatch, term: Term) -> dict[str, torch.Tensor]:
        metrics = policy_metrics(batch)
        metrics["sft/nll_mean"] = masked_mean(-term.lp, batch.mask)
        return metrics


register("importance-sampling", ImportanceSampling)
register("cross-entropy", CrossEntropy)
