"""Decoupled PPO and M2PO: PPO clipped against a proximal policy, with a behaviour weight for stale samples.

AReaL (Fu et al., "AReaL: A Large-Scale Asynchronous Reinforcement Learning System for Language Reasoning",
arXiv 2505.24298, §5 "decoupled PPO objective") separates the policy that sampled the tokens (the behaviour policy
μ, pgzoo's ``rollout_logprobs``) from the policy that anchors the trust region (the proximal policy π_prox, the
training engine's log-probs recomputed before the update: pgzoo's ``old_logprobs``). Per token, with
u = exp(lp − prox) and w = π_prox/μ = exp(prox − mu)::

    term = c(w) · min(u·A, clip(u, 1 − ε_low, 1 + ε_high)·A)          (and ≥ c_dual·A for A < 0 with ``clip_c``)
    loss = −Σ_i Σ_t m·term / N_tok                                     (``token-mean``, AReaL's default)

c(w) is pgzoo's training–inference :class:`~pgzoo.objectives.correction.Correction` applied to w = π_prox/μ: its
level, truncation or band, veto and metrics act on the behaviour weight; ``correction=None`` leaves w as it is
(c(w) = w, the paper's formula; its log clamped at ±20 as every ratio is). The default is AReaL's long-standing
``behav_imp_weight_cap=5`` in token-mask mode — w kept as is where w ≤ 5, the token dropped (weight 0) where w > 5
— which is ``Correction(level="token", mode="mask", low=0, high=5)`` (AReaL 1.0.4's ``rejection_sampling`` with
``level=token, action=mask, metric=ratio, upper=5``); ``mode="truncate"`` is AReaL's ``action=clamp``,
``level="geometric"`` its sequence level (geometric mean). AReaL 1.0.4 with ``rejection_sampling=None`` applies no
behaviour weight at all: that loss is plain PPO against π_prox, ``pgzoo.get("dapo", eps_high=0.2)``. ε 0.2/0.2 (AReaL's ``eps_clip=0.2``, ``eps_clip_higher=None``).
With the proximal policy recomputed (``prox_alpha=None``) this is ``dapo``'s PPO term at ε 0.2/0.2 times the
correction — the same loss and gradient as ``pgzoo.get("grpo", aggregation="token-mean", correction=...)``.

Proximal approximation (``prox_alpha`` = α, AReaL's ``prox_logp_method="loglinear"``): instead of a forward pass,
log π_prox = mu + α·(sg(lp) − mu), the log-linear interpolation between the behaviour policy and the current one.
AReaL takes α per token from policy versions, α = (v_θ − 1 − v_μ)/(v_θ − v_μ) clamped to [0, 1] (the proximal
policy is one version behind the current); a TokenBatch carries no versions, so α is one number for the batch
(tokens k versions stale: α = (k − 1)/k). ``old_logprobs`` are then ignored; the proximal log-probs carry no
gradient (AReaL interpolates with the detached current log-probs).

M2PO (Zheng, Zhao, Chen, "Prosperity before Collapse: How Far Can Off-Policy RL Reach with Stale Data on LLMs?",
arXiv 2510.01161), as AReaL implements it: before the loss, tokens are masked by the second moment of the
behaviour log-ratio, m2_it = (prox − mu)². Sorting the batch's unmasked tokens by m2, the largest are masked one by
one until the mean m2 of the tokens left is below τ (``m2_threshold``, 0.04 in the paper and AReaL's example); if
even the single smallest is ≥ τ, all but that one are masked. The paper's objective has no clip (M2PO replaces the
trust-region clip by this mask):

    term = M_it · exp(lp − mu) · A                        (``m2po``: ε None/None, no behaviour cap)

which is the decoupled form with no clip and an unbounded behaviour weight, u·w = exp(lp − prox)·exp(prox − mu). AReaL's
example configuration (``gsm8k_m2po.yaml``) adds ``eps_clip=0`` and ``behav_imp_weight_cap=5``:
``pgzoo.get("m2po", eps_low=0, eps_high=0, correction={"mode": "mask", "low": 0, "high": 5})``. The mask M depends
on the whole batch (its sorted m2 values), so ``m2po`` is not shard-additive (``shard_additive = False``): each
TokenBatch masks on its own, as each AReaL micro-batch does; pass the whole mini-batch in one call for the
paper's batch-level mask. Among tokens of equal m2 at the cut, the later one (row-major) is masked first. The loss
is normalised by N_tok, all the batch's tokens (the paper's 1/Σ|o_i|); AReaL's code divides each micro-batch by the
tokens M2PO kept (its token count is taken after the mask): pass that count as ``num_tokens`` to reproduce it.

Example:
    >>> pgzoo.get("decoupled-ppo")(pgzoo.TokenBatch(logprobs=lp, mask=m, advantages=a, old_logprobs=prox,
    ...                                            rollout_logprobs=behave))
    >>> pgzoo.get("m2po", prox_alpha=0.5)(pgzoo.TokenBatch(logprobs=lp, mask=m, advantages=a, rollout_logprobs=mu))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pgzoo.batch import TokenBatch
from pgzoo.objectives.base import Objective, Term, check_aggregation, log_bounds, ppo_clip_flags
from pgzoo.objectives.correction import Correction
from pgzoo.objectives.diagnostics import clip_metrics, masked_fraction, masked_max, masked_mean, policy_metrics
from pgzoo.objectives.ratios import ratio
from pgzoo.objectives.registry import register
from pgzoo.objectives.shaping import shaped
from pgzoo.validate import check_number

# AReaL's behav_imp_weight_cap = 5 in token-mask mode: tokens whose π_prox/μ exceeds 5 are dropped.
AREAL_BEHAVE_WEIGHT = Correction(level="token", mode="mask", low=0.0, high=5.0)


def clipped_term(u: torch.Tensor, adv: torch.Tensor, low: torch.Tensor, high: torch.Tensor,
                 eps_low: float | None, eps_high: float | None, dual: torch.Tensor | None,
                 clip_c: float | None) -> torch.Tensor:
    """min(u·A, clip(u)·A) (and ≥ c·A where ``dual``) as "u where kept, the constant bound where clipped", so a
    clipped token's gradient is exactly 0; a None ε leaves that side unclipped (its flags are then all false)."""
    if eps_low is None and eps_high is None and dual is None:
        return u * adv  # nothing can be clipped (M2PO's default): the plain importance-weighted term
    bound = u.detach()
    if eps_low is not None or eps_high is not None:
        bound = bound.clamp(min=None if eps_low is None else 1.0 - eps_low,
                            max=None if eps_high is None else 1.0 + eps_high)
    clipped = low | high
    if dual is not None:
        bound = bound.masked_fill(dual, clip_c)  # dual (u > c > 1) and low (u < 1 − ε_low) are disjoint
        clipped = clipped | dual
    return (bound + (u - bound) * ~clipped) * adv


def m2_keep(m2: torch.Tensor, mask: torch.Tensor, threshold: float) -> torch.Tensor:
    """M2PO's mask: ``[B, T]`` bool, True for the unmasked tokens kept.

    Sorted ascending, the kept tokens are the longest prefix whose mean m2 is below ``threshold`` (at least one
    token when there is one): the same set as AReaL's descending sort that masks the largest until the mean of the
    rest is below the threshold. No host sync: one stable sort over all positions (masked ones last, as +inf), a
    cumulative mean, and a scatter of the ranks.
    """
    flat = torch.where(mask, m2, torch.inf).reshape(-1)
    n = torch.count_nonzero(mask)
    sorted_m2, order = torch.sort(flat, stable=True)
    position = torch.arange(flat.numel(), device=flat.device)
    valid = position < n
    # +inf at masked positions only enters the cumulative sum after every unmasked value: the prefix means of the
    # unmasked part stay exact, and the invalid tail is excluded by `valid`
    prefix_mean = torch.cumsum(torch.where(valid, sorted_m2, 0.0), 0) / (position + 1).to(flat.dtype)
    kept_count = torch.count_nonzero((prefix_mean < threshold) & valid).clamp_min(1)  # AReaL keeps one at least
    keep_sorted = (position < kept_count) & valid
    keep = torch.zeros_like(keep_sorted).scatter(0, order, keep_sorted)
    return keep.reshape(mask.shape)


class DecoupledPPO(Objective):
    """AReaL's decoupled PPO (arXiv 2505.24298): c(π_prox/μ)·min(u·A, clip(u)·A), u = π_θ/π_prox, token-mean.

    Config:
        eps_low, eps_high: clip range of u (0.2, 0.2: AReaL's ``eps_clip``); None leaves that side unclipped.
        clip_c: dual-clip bound c > 1 for A < 0 (AReaL's ``c_clip``), or None (default).
        prox_alpha: None (default): π_prox = ``old_logprobs`` (AReaL's ``recompute``); α in [0, 1]: log π_prox =
            mu + α·(sg(lp) − mu) (AReaL's ``loglinear``), ``old_logprobs`` unused.
        aggregation: ``token-mean`` (AReaL's), or any token-level mode of :func:`pgzoo.aggregate`.
        correction: the behaviour weight c(π_prox/μ) (default: AReaL's token mask at 5); None: w unbounded.
        beta, kl, ...: the loss-shaping options of :mod:`pgzoo.objectives.shaping` (``correct_kl`` has no effect:
            the behaviour weight belongs to the policy term).
    """

    @shaped
    @dataclass(frozen=True)
    class Config:
        eps_low: float | None = 0.2
        eps_high: float | None = 0.2
        clip_c: float | None = None
        prox_alpha: float | None = None
        aggregation: str = "token-mean"
        correction: Correction | None = AREAL_BEHAVE_WEIGHT

    requires = frozenset({"rollout_logprobs"})  # the behaviour policy μ of the weight π_prox/μ
    default_advantage = "group-mean-std"
    applies_correction = False  # the behaviour weight is computed against π_prox, inside the policy term
    paper = "AReaL: A Large-Scale Asynchronous Reinforcement Learning System for Language Reasoning (arXiv 2505.24298)"

    def _check_config(self) -> None:
        c = self.config
        check_number(f"{self.name}: eps_low", c.eps_low, low=0.0, high=1.0, high_open=True, optional=True,
                     hint="AReaL uses 0.2; null: no lower clip")
        check_number(f"{self.name}: eps_high", c.eps_high, low=0.0, optional=True,
                     hint="AReaL uses 0.2; null: no upper clip")
        check_number(f"{self.name}: clip_c", c.clip_c, low=1.0, low_open=True, optional=True,
                     hint="the dual-clip bound for negative advantages; null disables it")
        check_number(f"{self.name}: prox_alpha", c.prox_alpha, low=0.0, high=1.0, optional=True,
                     hint="the log-linear proximal approximation's α = (k − 1)/k for k versions of staleness; "
                          "null: the recomputed old_logprobs")
        check_aggregation(self.name, c.aggregation)

    def proximal_batch(self, batch: TokenBatch, lp: torch.Tensor) -> tuple[TokenBatch, torch.Tensor]:
        """The batch with π_prox as its ``old_logprobs``, and log π_prox (detached, 0 at masked positions)."""
        alpha = self.config.prox_alpha
        if alpha is None:
            return batch, batch.clean("old_logprobs")
        mu = batch.clean("rollout_logprobs")
        prox = mu + alpha * (lp.detach() - mu)
        # values already checked in `batch`; the interpolation of checked values is finite
        return batch.replace(old_logprobs=prox, check_values=False), prox

    def token_mask(self, pbatch: TokenBatch, prox: torch.Tensor) -> torch.Tensor | None:
        """An extra token mask (M2PO's); None for decoupled PPO."""
        return None

    def policy_term(self, batch: TokenBatch) -> Term:
        c = self.config
        lp = batch.masked(batch.logprobs)
        pbatch, prox = self.proximal_batch(batch, lp)
        adv = batch.token_advantages()
        log_u = lp - prox
        low, high = ppo_clip_flags(log_u.detach(), adv, *log_bounds(c.eps_low, c.eps_high))
        u = ratio(log_u)
        dual = None
        if c.clip_c is not None:
            dual = (adv < 0) & (log_u.detach() > math.log(c.clip_c))
        value = clipped_term(u, adv, low, high, c.eps_low, c.eps_high, dual, c.clip_c)
        corr_metrics = {}
        if c.correction is not None:
            w, corr_metrics = c.correction.token_weights(pbatch, self.report_metrics)
        else:
            w = ratio(prox - pbatch.clean("rollout_logprobs"))  # π_prox/μ unbounded (log clamped at ±20)
        value = w * value
        keep = self.token_mask(pbatch, prox)
        if keep is not None:
            value = torch.where(keep, value, 0.0)
        return Term(value, lp=lp, ratio=u, saved=dict(pbatch=pbatch, log_u=log_u, u=u, low=low, high=high,
                                                      dual=dual, keep=keep, w=w, corr_metrics=corr_metrics))

    def term_metrics(self, batch: TokenBatch, term: Term) -> dict[str, torch.Tensor]:
        s, mask = term.saved, batch.mask
        # the staleness and training–inference splits are taken against π_prox (the batch with it as old)
        metrics = policy_metrics(s["pbatch"], s["log_u"].detach(), staleness_expm1=s["u"].detach() - 1.0)
        metrics.update(clip_metrics(s["low"], s["high"], mask))
        if s["dual"] is not None:
            metrics["clip/dual_fraction"] = masked_fraction(s["dual"], mask)
        if s["keep"] is not None:
            metrics["decoupled/m2_masked_fraction"] = masked_fraction(~s["keep"], mask)
        metrics["decoupled/behave_weight_mean"] = masked_mean(s["w"], mask)
        metrics["decoupled/behave_weight_max"] = masked_max(s["w"], mask)
        metrics.update(s["corr_metrics"])
        return metrics


class M2PO(DecoupledPPO):
    """M2PO (arXiv 2510.01161): decoupled PPO with the second-moment token mask; defaults are the paper's
    (no clip, no behaviour cap: M·exp(lp − mu)·A, token-mean).

    Config: those of :class:`DecoupledPPO`, plus ``m2_threshold`` τ > 0 (0.04): tokens are masked, largest
    (prox − mu)² first, until the batch's mean (prox − mu)² over the tokens left is below τ.
    """

    @shaped
    @dataclass(frozen=True)
    class Config:
        eps_low: float | None = None
        eps_high: float | None = None
        clip_c: float | None = None
        prox_alpha: float | None = None
        aggregation: str = "token-mean"
        correction: Correction | None = None
        m2_threshold: float = 0.04

    # the mask depends on the m2 values of the whole TokenBatch (sorted): micro-batches each mask on their own
    shard_additive = False
    paper = "Prosperity before Collapse: How Far Can Off-Policy RL Reach with Stale Data on LLMs? (arXiv 2510.01161)"

    def _check_config(self) -> None:
        super()._check_config()
        check_number(f"{self.name}: m2_threshold", self.config.m2_threshold, low=0.0, low_open=True,
                     hint="the paper and AReaL's example use 0.04")

    def token_mask(self, pbatch: TokenBatch, prox: torch.Tensor) -> torch.Tensor:
        m2 = (prox - pbatch.clean("rollout_logprobs")).square()
        return m2_keep(m2, pbatch.mask, self.config.m2_threshold)


register("decoupled-ppo", DecoupledPPO)
register("m2po", M2PO)
