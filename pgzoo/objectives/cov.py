"""Clip-Cov and KL-Cov: PPO whose few highest-covariance tokens are detached (Clip-Cov) or KL-penalised (KL-Cov).

Cui et al., "The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models" (arXiv 2505.22617),
as verl 0.9.1 implements them (``policy_loss.loss_mode=clip_cov`` / ``kl_cov``). Per token, with r = exp(lp − old),
lr = lp − old and the centred covariance of each token over the unmasked tokens of the batch::

    cov_it = (A_it − mean(A)) · (sg(lp_it) − mean(sg(lp)))

    clip-cov  term = (1 − S_it) · min(r·A, clip(r, 1 − ε_low, 1 + ε_high)·A)
              S = n tokens among those not clipped by PPO with lb < cov < ub     (n = max(⌊ρ·N⌋, 1))
    kl-cov    term = r·A − S_it·β·|lr|                                           (no ratio clipping)
              S = the n tokens of largest cov                                    (n = max(⌊ρ·N⌋, 1))
    loss = −Σ_i Σ_t m·term / N_tok                                               (``aggregation``)

N is the number of unmasked tokens of the batch passed in. Defaults are verl's: ε 0.2/0.2, ρ = 2e-4 for both,
lb = 1, ub = 5 (Clip-Cov), β = ``ppo_kl_coef`` = 0.1 (KL-Cov), token-mean.

Selection is deterministic. verl's Clip-Cov draws its n tokens uniformly at random (``torch.randperm``) from the
candidates; pgzoo takes the candidates of largest covariance, the earlier token (row-major) first among equal
covariances — the same rule KL-Cov uses, where verl takes ``torch.topk``. Where the candidates number at most n,
both pick all of them and agree exactly with verl; the tests compare with verl's own function with its random draw
replaced by this ranking. The selection uses no host sync (n stays a tensor; one ``topk`` over an upper bound of n
taken from the batch's shape, one ``nonzero_static`` for ties), and the selected terms are changed at their
positions only, so the cost over PPO is that of the covariance, the ``topk`` and two passes.

Both depend on statistics of the whole batch passed in (the means, N and the ranking): split into micro-batches,
each selects on its own, as in verl, so micro-batch gradients do not add up to the whole batch's
(``shard_additive = False``). An optional training–inference ``correction`` multiplies the term by its weight.

Reduces to: with a band no covariance falls in (``cov_lb >= cov_ub`` is refused) ``clip-cov`` is PPO-clip with
token-mean (``dapo`` with ε_high = 0.2); ``kl-cov`` with β = 0 is the unclipped surrogate r·A, token-mean.

Example:
    >>> out = pgzoo.get("kl-cov")(pgzoo.TokenBatch(logprobs=lp, mask=m, advantages=a, old_logprobs=old))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pgzoo.batch import TokenBatch
from pgzoo.objectives.correction import Correction
from pgzoo.objectives.diagnostics import clip_metrics, masked_fraction, policy_metrics
from pgzoo.errors import ConfigError
from pgzoo.objectives.base import Objective, Term, check_aggregation, check_eps, log_bounds, ppo_clip_flags
from pgzoo.objectives.grpo import clipped_surrogate
from pgzoo.objectives.ratios import ratio
from pgzoo.objectives.registry import register
from pgzoo.objectives.shaping import shaped


def token_covariance(batch: TokenBatch, adv: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
    """(A − mean A)·(lp − mean lp) per token (detached), means over the unmasked tokens.

    ``adv`` (``[B, 1]`` per sequence, or ``[B, T]``) and ``lp`` are zero at masked positions. The result there is
    finite but meaningless (callers select among unmasked tokens only).
    """
    n = batch.local_token_count().clamp_min(1.0)
    lp = lp.detach()
    adv_total = adv[:, 0].dot(batch.seq_lengths()) if adv.shape[1] == 1 else adv.sum()  # Σ over tokens
    return (adv - adv_total / n) * (lp - lp.sum() / n)


def select_top(key: torch.Tensor, candidates: torch.Tensor, ratio_: float,
               batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The n = max(⌊ρ·N⌋, 1) candidates of largest ``key``, the earlier (row-major) index first among equal keys.

    Fewer candidates than n: all of them. N is the batch's unmasked-token count. Returns flat indices into ``key``
    and a same-length bool telling which are selected (the rest are padding at index 0), so that n stays a tensor
    and nothing syncs with the host: one ``topk`` over k_max = max(⌊ρ·B·T⌋, 1) ≥ n finds the n-th largest key
    (every key above it is among those k_max), and the keys equal to it are taken in index order from one
    ``nonzero_static`` pass, as many as still fit.
    """
    flat_cand = candidates.reshape(-1)
    flat_key = torch.where(flat_cand, key.reshape(-1), -torch.inf)
    n = torch.floor(batch.local_token_count().double() * ratio_).clamp_min(1.0).to(torch.long)
    k_max = min(max(int(ratio_ * flat_key.numel()), 1), flat_key.numel())  # ≥ n: N ≤ B·T
    top = torch.topk(flat_key, k_max, sorted=True)
    thr = top.values.gather(0, (n - 1).clamp(max=k_max - 1).reshape(1))  # n-th largest (−inf: fewer candidates)
    above = top.values > thr  # −inf is never above, so only candidates
    first_tied = torch.nonzero_static(flat_key == thr, size=k_max, fill_value=-1)[:, 0]  # ascending indices
    room = n - above.sum()  # how many of the tied keys still fit
    tied = (first_tied >= 0) & (torch.arange(k_max, device=key.device) < room) & torch.isfinite(thr)
    return torch.cat([top.indices, first_tied.clamp(min=0)]), torch.cat([above, tied])


def selected_mask(idx: torch.Tensor, chosen: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The ``[B, T]`` bool mask of :func:`select_top`'s selection (for metrics and tests)."""
    flat = torch.zeros(like.numel(), dtype=torch.bool, device=like.device)
    return flat.index_put((idx,), chosen, accumulate=True).reshape(like.shape)


def selected_fraction(chosen: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """The share of the batch's unmasked tokens :func:`select_top` selected (the metric ``cov/selected_fraction``)."""
    return chosen.sum().float() / batch.local_token_count().float().clamp_min(1.0)


def add_at(term: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``term`` with ``values`` added at flat positions ``idx`` (differentiable in both; repeats add up)."""
    return term.reshape(-1).index_put((idx,), values, accumulate=True).reshape(term.shape)


def _check_positive(name: str, key: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{name}: {key}={value!r} must be a number > 0")


class ClipCov(Objective):
    """Clip-Cov (arXiv 2505.22617): PPO-clip with the n highest-covariance in-band tokens detached.

    Config:
        eps_low, eps_high: PPO clip range (0.2, 0.2).
        cov_ratio: ρ, the share of tokens to detach (2e-4; at least one token).
        cov_lb, cov_ub: the covariance band of the candidates (1, 5).
        aggregation: ``token-mean`` or any token-level mode of :func:`pgzoo.aggregate`.
        correction: optional training–inference correction.
        beta, kl, ...: the loss-shaping options of :mod:`pgzoo.objectives.shaping` (all off by default; the
            reference KL is apart from KL-Cov's own ``kl_coef`` penalty on |lp − old|).
    """

    @shaped
    @dataclass(frozen=True)
    class Config:
        eps_low: float = 0.2
        eps_high: float = 0.2
        cov_ratio: float = 2e-4
        cov_lb: float = 1.0
        cov_ub: float = 5.0
        aggregation: str = "token-mean"
        correction: Correction | None = None

    default_advantage = "group-mean-std"
    paper = "The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models (arXiv 2505.22617)"
    shard_additive = False
    bands = (("cov_lb", "cov_ub"),)  # a reversed or empty band selects no token: clip-cov would silently be PPO

    def _check_config(self) -> None:
        c = self.config
        check_eps(type(self).__name__, c.eps_low, c.eps_high)
        _check_positive(self.name, "cov_ratio", c.cov_ratio)
        for key in ("cov_lb", "cov_ub"):
            value = getattr(c, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise ConfigError(f"{self.name}: {key}={value!r} must be a number (a covariance bound)")
        check_aggregation(self.name, c.aggregation)

    def policy_term(self, batch: TokenBatch) -> Term:
        c = self.config
        mask = batch.mask
        lp = batch.masked(batch.logprobs)
        adv = batch.token_advantages()  # dense and masked: r = 1 at masked positions, so r·A needs A = 0 there
        log_r = lp - batch.clean("old_logprobs")
        low, high = ppo_clip_flags(log_r.detach(), adv, *log_bounds(c.eps_low, c.eps_high))
        cov = token_covariance(batch, adv, lp)
        candidates = mask & ~(low | high) & (cov > c.cov_lb) & (cov < c.cov_ub)
        idx, chosen = select_top(cov, candidates, c.cov_ratio, batch)
        r = ratio(log_r)
        term = clipped_surrogate(r, adv, low, high, c.eps_low, c.eps_high)
        # a selected token's term is cancelled exactly (x − x = 0, gradient 1 − 1 = 0): k_max positions, no dense pass
        term = add_at(term, idx, -term.reshape(-1).index_select(0, idx) * chosen)
        return Term(term, lp=lp, ratio=r,
                    saved=dict(log_r=log_r, low=low, high=high, chosen=chosen, candidates=candidates))

    def term_metrics(self, batch: TokenBatch, term: Term) -> dict[str, torch.Tensor]:
        s, mask = term.saved, batch.mask
        metrics = policy_metrics(batch, s["log_r"].detach())
        metrics["cov/selected_fraction"] = selected_fraction(s["chosen"], batch)
        metrics["cov/candidate_fraction"] = masked_fraction(s["candidates"], mask)
        metrics.update(clip_metrics(s["low"], s["high"], mask))
        return metrics


class KLCov(Objective):
    """KL-Cov (arXiv 2505.22617): the unclipped surrogate r·A with β·|lp − old| on the n highest-covariance tokens.

    Config:
        cov_ratio: ρ, the share of tokens penalised (2e-4; at least one token).
        kl_coef: β (0.1, verl's ``ppo_kl_coef``).
        aggregation: ``token-mean`` or any token-level mode of :func:`pgzoo.aggregate`.
        correction: optional training–inference correction.
        beta, kl, ...: the loss-shaping options of :mod:`pgzoo.objectives.shaping` (all off by default; the
            reference KL is apart from KL-Cov's own ``kl_coef`` penalty on |lp − old|).
    """

    @shaped
    @dataclass(frozen=True)
    class Config:
        cov_ratio: float = 2e-4
        kl_coef: float = 0.1
        aggregation: str = "token-mean"
        correction: Correction | None = None

    default_advantage = "group-mean-std"
    paper = "The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models (arXiv 2505.22617)"
    shard_additive = False

    def _check_config(self) -> None:
        c = self.config
        _check_positive(self.name, "cov_ratio", c.cov_ratio)
        if isinstance(c.kl_coef, bool) or not isinstance(c.kl_coef, (int, float)) or not c.kl_coef >= 0:
            raise ConfigError(f"{self.name}: kl_coef={c.kl_coef!r} must be a number >= 0")
        check_aggregation(self.name, c.aggregation)

    def policy_term(self, batch: TokenBatch) -> Term:
        c = self.config
        mask = batch.mask
        lp = batch.masked(batch.logprobs)
        adv = batch.token_advantages()  # dense and masked: r = 1 at masked positions, so r·A needs A = 0 there
        log_r = lp - batch.clean("old_logprobs")
        idx, chosen = select_top(token_covariance(batch, adv, lp), mask, c.cov_ratio, batch)
        # the penalty touches at most 2·k_max positions: add it there instead of a dense |lr| pass
        penalty = (c.kl_coef * chosen.to(lp.dtype)) * log_r.reshape(-1).index_select(0, idx).abs()
        r = ratio(log_r)
        return Term(add_at(r * adv, idx, -penalty), lp=lp, ratio=r, saved=dict(log_r=log_r, chosen=chosen))

    def term_metrics(self, batch: TokenBatch, term: Term) -> dict[str, torch.Tensor]:
        metrics = policy_metrics(batch, term.saved["log_r"].detach())
        metrics["cov/selected_fraction"] = selected_fraction(term.saved["chosen"], batch)
        return metrics


register("clip-cov", ClipCov)
register("kl-cov", KLCov)
