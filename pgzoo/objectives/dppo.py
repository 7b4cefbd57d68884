"""DPPO: REINFORCE with a truncated IS weight, masked by a divergence trust region instead of ratio clipping.

Qi et al., "Rethinking the Trust Region in LLM Reinforcement Learning" (arXiv 2602.04879), Binary-TV and Binary-KL
variants, as verl 0.9.1 implements them (``policy_loss.loss_mode=dppo_tv`` / ``dppo_kl``). Per token, with
p = exp(lp), p_old = exp(old), r = exp(lp − old)::

    term = M · sg(min(r, C)) · A · lp
    loss = −Σ_i Σ_t m·term / N_tok                      (``aggregation``, default token-mean)

    dppo-tv   M = 0 if A > 0 and p − p_old > δ_high, or A < 0 and p − p_old < −δ_low; else 1
    dppo-kl   M = 0 if A > 0 and p > p_old and D > δ_high, or A < 0 and p < p_old and D > δ_low; else 1
              D = p_old·log(p_old/p) + (1 − p_old)·log((1 − p_old + 1e-8)/(1 − p + 1e-8))   (binary KL)

∇_lp loss = −M·min(r, C)·A / N_tok. The thresholds δ are verl's ``clip_ratio_low``/``clip_ratio_high``
(``eps_low``/``eps_high`` here, 0.2 by default) read as divergence bounds; C (``is_cap``) is verl's
``clip_ratio_c``, 3 in verl's actor config (the loss function's own fallback, and the paper's advice, is a large
cap such as 20: ``pgzoo.get("dppo-tv", is_cap=20)``). The 1e-8 guard in D is verl's; log-probabilities above 0
(not probabilities) are read as 0 before exponentiating, so p ≤ 1 and D stays finite. An optional
training–inference ``correction`` multiplies the term by its stop-gradient weight.

Shapes: ``logprobs``/``old_logprobs`` ``[B, T]``; advantages ``[B]`` or ``[B, T]``.

Reduces to: on-policy (p = p_old, r = 1) token-mean REINFORCE, the gradient of ``gpg``; with huge thresholds
``cispo`` with ε_low = None and ε_high = C − 1.

Example:
    >>> out = pgzoo.get("dppo-tv")(pgzoo.TokenBatch(logprobs=lp, mask=m, advantages=a, old_logprobs=old))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pgzoo.batch import TokenBatch
from pgzoo.objectives.correction import Correction
from pgzoo.objectives.diagnostics import clip_metrics, masked_max, masked_mean, policy_metrics, weight_metrics
from pgzoo.errors import ConfigError
from pgzoo.objectives.base import Objective, Term, advantage_factor, check_aggregation
from pgzoo.objectives.ratios import MAX_LOG_RATIO
from pgzoo.objectives.registry import register
from pgzoo.objectives.shaping import shaped

_BKL_GUARD = 1e-8  # verl's guard inside the binary KL's log((1 − p_old)/(1 − p))


def binary_divergence(kind: str, lp: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """The per-token divergence DPPO bounds: ``tv`` p − p_old (signed), ``kl`` the binary KL D(p_old ‖ p) ≥ 0.

    Inputs are log-probabilities (clamped to ≤ 0 here); the result is finite for any finite input.
    """
    lp, old = lp.clamp(max=0.0), old.clamp(max=0.0)
    p, p_old = lp.exp(), old.exp()
    if kind == "tv":
        return p - p_old
    q_old = 1.0 - p_old  # as verl: near p = 1 the 1e-8 guard dominates anyway
    return p_old * (old - lp) + q_old * (torch.log(q_old + _BKL_GUARD) - torch.log((1.0 - p) + _BKL_GUARD))


class DPPO(Objective):
    """DPPO (arXiv 2602.04879): M·sg(min(r, C))·A·log π_θ with a binary TV or KL trust-region mask M.

    Config:
        divergence: ``"tv"`` (``dppo-tv``) or ``"kl"`` (``dppo-kl``).
        eps_low, eps_high: divergence thresholds δ_low, δ_high for A < 0 and A > 0 (0.2, 0.2: verl's defaults).
        is_cap: C, the truncation of the stop-gradient IS weight r (3: verl's actor default ``clip_ratio_c``).
        aggregation: ``token-mean`` or any token-level mode of :func:`pgzoo.aggregate`.
        correction: optional training–inference correction.
        beta, kl, ...: the loss-shaping options of :mod:`pgzoo.objectives.shaping` (all off by default).
    """

    @shaped
    @dataclass(frozen=True)
    class Config:
        divergence: str = "tv"
        eps_low: float = 0.2
        eps_high: float = 0.2
        is_cap: float = 3.0
        aggregation: str = "token-mean"
        correction: Correction | None = None

    default_advantage = "group-mean-std"
    paper = "Rethinking the Trust Region in LLM Reinforcement Learning (arXiv 2602.04879)"

    def _check_config(self) -> None:
        c = self.config
        if c.divergence not in ("tv", "kl"):
            raise ConfigError(f"{self.name}: divergence={c.divergence!r} must be 'tv' (dppo-tv) or 'kl' (dppo-kl)")
        for key in ("eps_low", "eps_high", "is_cap"):
            value = getattr(c, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"{self.name}: {key}={value!r} must be a number > 0")
        check_aggregation(self.name, c.aggregation)

    def policy_term(self, batch: TokenBatch) -> Term:
        c = self.config
        lp = batch.masked(batch.logprobs)
        adv = advantage_factor(batch)  # [B, 1] or [B, T]
        old = batch.clean("old_logprobs")
        lp_d = lp.detach()
        log_r = lp_d - old
        r_minus_one = log_r.clamp(max=MAX_LOG_RATIO).expm1()
        weight = (r_minus_one + 1.0).clamp_(max=c.is_cap)
        div = binary_divergence(c.divergence, lp_d, old)  # 0 at masked positions (p = p_old = 1)
        if c.divergence == "tv":
            high = (adv > 0) & (div > c.eps_high)
            low = (adv < 0) & (div < -c.eps_low)
        else:
            high = (adv > 0) & (div > c.eps_high) & (log_r > 0)
            low = (adv < 0) & (div > c.eps_low) & (log_r < 0)
        coef = weight * adv * ~(low | high)
        return Term(coef * lp, lp=lp, saved=dict(log_r=log_r, r_minus_one=r_minus_one, weight=weight, div=div,
                                                 low=low, high=high))

    def term_metrics(self, batch: TokenBatch, term: Term) -> dict[str, torch.Tensor]:
        c, s, mask = self.config, term.saved, batch.mask
        metrics = policy_metrics(batch, s["log_r"], staleness_expm1=s["r_minus_one"])
        size = s["div"].abs() if c.divergence == "tv" else s["div"]
        metrics[f"dppo/{c.divergence}_mean"] = masked_mean(size, mask)
        metrics[f"dppo/{c.divergence}_max"] = masked_max(size, mask)
        metrics.update(clip_metrics(s["low"], s["high"], mask))
        metrics.update(weight_metrics(s["weight"], s["log_r"] > math.log(c.is_cap), mask, batch.mask_float()))
        return metrics


register("dppo-tv", DPPO)
register("dppo-kl", DPPO, divergence="kl")
