"""The PPO-clip surrogate family: GRPO, Dr. GRPO and DAPO — one term, three aggregations.

Per token (i, t), with r = exp(lp − old), A the advantage and ref the reference policy::

    term = min(r·A, clip(r, 1 − ε_low, 1 + ε_high)·A) − β·k3,    k3 = exp(ref − lp) − (ref − lp) − 1

    grpo     loss = −Σ_i (1/|y_i|) Σ_t m·term / N_seq      ε .2/.2, β 0, advantage group-mean-std
    dr-grpo  loss = −Σ_i Σ_t m·term / (N_seq·L)            ε .2/.2,      advantage group-mean
    dapo     loss = −Σ_i Σ_t m·term / N_tok                ε .2/.28,     advantage group-mean-std

∇_lp term = r·A where the surrogate is unclipped (not (A > 0 and r > 1+ε_high), not (A < 0 and r < 1−ε_low)), 0
where it is clipped, minus β·(1 − exp(ref − lp)) for the KL term. An optional training–inference ``correction``
(:mod:`pgzoo.correction`) multiplies the whole term by its stop-gradient weight.

Dual clip (``clip_c`` = c > 1; Ye et al., "Mastering Complex Control in MOBA Games with Deep Reinforcement
Learning", arXiv 1912.09729, as verl's ``vanilla`` loss applies it): for A < 0 the surrogate is further bounded
below, max(min(r·A, clip(r)·A), c·A), so a token with A < 0 and r > c contributes the constant c·A and no
gradient. ``grpo``, ``dr-grpo`` and ``dapo`` come from TRL, which has no dual clip: their default is
``clip_c=None`` (off). ``dual-clip-ppo`` is verl's ``vanilla`` out of the box: ε 0.2/0.2, c = 3, token-mean.

Papers: GRPO — Shao et al., "DeepSeekMath" (arXiv 2402.03300); Dr. GRPO — Liu et al., "Understanding R1-Zero-Like
Training: A Critical Perspective" (arXiv 2503.20783); DAPO — Yu et al. (arXiv 2503.14476).

Reduces to: on-policy with β = 0 all three are REINFORCE, −Σ A·lp, differing only in normalisation; with one token
per sequence GRPO equals GSPO at the same ε.

Example:
    >>> out = pgzoo.get("grpo", beta=0.04)(pgzoo.TokenBatch(logprobs=lp, mask=m, advantages=a,
    ...                                                    old_logprobs=old, ref_logprobs=ref))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pgzoo.batch import TokenBatch
from pgzoo.correction import Correction
from pgzoo.diagnostics import clip_metrics, masked_fraction, masked_mean, policy_metrics
from pgzoo.errors import ConfigError
from pgzoo.objectives.base import (
    MAX_LOG_RATIO,
    Objective,
    ObjectiveOutput,
    aggregate,
    check_aggregation,
    check_eps,
    check_number,
    log_bounds,
    ppo_clip_flags,
)
from pgzoo.registry import register


def ratio(log_r: torch.Tensor) -> torch.Tensor:
    """r = exp(log r) with log r clamped to ±MAX_LOG_RATIO (finite in float32; exact gradient inside the band)."""
    return log_r.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO).exp()


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


def k3(lp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(π_θ‖π_ref): exp(ref − lp) − (ref − lp) − 1 (≥ 0; log-ratio clamped ±20)."""
    d = (ref - lp).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    return torch.expm1(d) - d


class GRPO(Objective):
    """PPO-clip surrogate with an optional k3 KL penalty (GRPO, Dr. GRPO, DAPO).

    Config:
        eps_low, eps_high: clip range of r (0.2, 0.2; DAPO 0.2, 0.28).
        beta: KL coefficient β (0). β > 0 requires ``ref_logprobs``.
        clip_c: dual-clip bound c > 1 for negative advantages, or None (off; ``dual-clip-ppo``: 3, verl's default).
        aggregation: ``seq-mean-token-mean`` (grpo), ``constant`` (dr-grpo), ``token-mean`` (dapo), or any
            token-level mode of :func:`pgzoo.aggregate`.
        correction: optional training–inference correction (None, a Correction, or a dict of its fields).
    """

    @dataclass(frozen=True)
    class Config:
        eps_low: float = 0.2
        eps_high: float = 0.2
        beta: float = 0.0
        aggregation: str = "seq-mean-token-mean"
        correction: Correction | None = None
        clip_c: float | None = None

    default_advantage = "group-mean-std"
    paper = "DeepSeekMath (arXiv 2402.03300)"

    def _check_config(self) -> None:
        c = self.config
        check_eps(type(self).__name__, c.eps_low, c.eps_high)
        check_number(f"{self.name}: beta", c.beta, low=0.0, hint="0 disables the KL term")
        check_aggregation(self.name, c.aggregation)
        if c.clip_c is not None and (isinstance(c.clip_c, bool) or not isinstance(c.clip_c, (int, float))
                                     or not c.clip_c > 1):
            raise ConfigError(f"{self.name}: clip_c={c.clip_c!r} must be a number > 1 (the dual-clip bound on r "
                              "for negative advantages; verl uses 3) or None (no dual clip)")

    def extra_requires(self) -> frozenset[str]:
        extra = set(super().extra_requires())
        if self.config.beta > 0:
            extra.add("ref_logprobs")
        return frozenset(extra)

    def compute(self, batch: TokenBatch) -> ObjectiveOutput:
        c = self.config
        mask = batch.mask
        lp = batch.masked(batch.logprobs)
        adv = batch.token_advantages()
        log_r = lp - batch.clean("old_logprobs")
        low, high = ppo_clip_flags(log_r.detach(), adv, *log_bounds(c.eps_low, c.eps_high))
        r = ratio(log_r)
        dual = None
        if c.clip_c is not None:
            dual = (adv < 0) & (log_r.detach() > math.log(c.clip_c))
        term = clipped_surrogate(r, adv, low, high, c.eps_low, c.eps_high, dual, c.clip_c)
        if c.beta > 0:
            kl = k3(lp, batch.clean("ref_logprobs"))
            term = term - c.beta * kl
        if c.correction is not None:
            weight, corr_metrics = c.correction.token_weights(batch)
            term = weight * term
        loss = -aggregate(term, batch, c.aggregation, clean=True)
        if not self.report_metrics:
            return ObjectiveOutput(loss, {})
        metrics = policy_metrics(batch, log_r.detach(), staleness_expm1=r.detach() - 1.0)
        if c.beta > 0:
            metrics["kl/ref_k3"] = masked_mean(kl, mask)
        if c.correction is not None:
            metrics.update(corr_metrics)
        metrics.update(clip_metrics(low, high, mask))
        if dual is not None:
            metrics["clip/dual_fraction"] = masked_fraction(dual, mask)
        return ObjectiveOutput(loss, metrics)


register("grpo", GRPO)
register("dr-grpo", GRPO, aggregation="constant", default_advantage="group-mean",
         paper="Understanding R1-Zero-Like Training: A Critical Perspective (arXiv 2503.20783)")
register("dapo", GRPO, eps_high=0.28, aggregation="token-mean",
         paper="DAPO: An Open-Source LLM Reinforcement Learning System at Scale (arXiv 2503.14476)")
register("dual-clip-ppo", GRPO, aggregation="token-mean", clip_c=3.0,
         paper="Mastering Complex Control in MOBA Games with Deep Reinforcement Learning (arXiv 1912.09729)")
