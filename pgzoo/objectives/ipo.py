"""prime-rl's IPO loss: a symmetric trust region on probability differences, the importance-weighted policy
gradient inside it, and a squared log-ratio penalty on every token.

prime-rl (``loss.type = "ipo"``, ``ipo_loss_fn`` in ``prime_rl/trainer/rl/loss.py``). Per token, with
lr = lp − old, r = exp(lr), p = exp(lp) and p_old = exp(old)::

    M    = 1[ |p − p_old| ≤ δ ]                                  (both signs of A: the region is symmetric)
    term = M · τ_A · r · A  −  τ_KL · lr²
    loss = −Σ_i Σ_t m·term / N_tok                              (``aggregation``, default ``token-mean``)

Defaults are prime-rl's (``IPOLossConfig``): ``threshold`` δ = 0.1 (``ipo_threshold``), ``adv_tau`` τ_A = 1,
``kl_tau`` τ_KL = 1e-3. ∇_lp term = M·τ_A·r·A − 2·τ_KL·lr: a token whose probability moved more than δ in either
direction loses its policy gradient, while the penalty keeps pulling every token back towards π_θold. Unlike
``dppo-tv`` (whose bound depends on the sign of A), the region does not look at the advantage.

prime-rl has no separate π_θold: its ``inference_logprobs`` (the sampler's) play that role, so prime-rl's loss is
this objective with ``old_logprobs`` = the sampler's log-probabilities; pgzoo's ``correction`` adds a training–
inference weight when both are available. The correction and the shaping masks multiply the whole per-token term,
penalty included, as prime-rl's per-token ``loss_weights`` do. prime-rl sums over tokens and divides by the global count of loss tokens,
which is ``token-mean`` with ``num_tokens`` the global count.

Numerical choices: r's log is clamped at ±20 (as every pgzoo ratio with gradient), and p, p_old are read from
log-probabilities clamped at 0 (p ≤ 1), so the region test is finite whatever the inputs.

Reduces to: on policy (lr = 0), token-mean REINFORCE scaled by τ_A (``gpg``'s gradient times τ_A).

Example:
    >>> out = pgzoo.get("prime-ipo")(pgzoo.TokenBatch(logprobs=lp, mask=m, advantages=a, old_logprobs=old))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pgzoo.batch import TokenBatch
from pgzoo.objectives.base import Objective, Term, check_aggregation
from pgzoo.objectives.correction import Correction
from pgzoo.objectives.diagnostics import masked_fraction, masked_max, masked_mean, policy_metrics
from pgzoo.objectives.ratios import masked_log_ratio, ratio
from pgzoo.objectives.registry import register
from pgzoo.objectives.shaping import shaped
from pgzoo.validate import check_number


class PrimeIPO(Objective):
    """prime-rl's IPO: M·τ_A·r·A − τ_KL·(lp − old)², M = 1[|p − p_old| ≤ δ], token-mean.

    Config:
        threshold: δ, the half-width of the trust region on p − p_old (prime-rl's ``ipo_threshold``, 0.1).
        adv_tau: τ_A, the scale of the policy-gradient term (1).
        kl_tau: τ_KL, the coefficient of the squared log-ratio penalty (1e-3).
        aggregation: ``token-mean``, or any token-level mode of :func:`pgzoo.aggregate`.
        correction: optional training–inference correction (it weights the whole term, penalty included).
        beta, kl, ...: the loss-shaping options of :mod:`pgzoo.objectives.shaping` (all off by default).
    """

    @shaped
    @dataclass(frozen=True)
    class Config:
        threshold: float = 0.1
        adv_tau: float = 1.0
        kl_tau: float = 1e-3
        aggregation: str = "token-mean"
        correction: Correction | None = None

    default_advantage = "group-mean-std"
    paper = "prime-rl's loss type 'ipo' (a symmetric probability trust region; cf. DPPO, arXiv 2602.04879)"

    def _check_config(self) -> None:
        c = self.config
        check_number(f"{self.name}: threshold", c.threshold, low=0.0,
                     hint="the bound on |p − p_old|; prime-rl uses 0.1")
        check_number(f"{self.name}: adv_tau", c.adv_tau, low=0.0)
        check_number(f"{self.name}: kl_tau", c.kl_tau, low=0.0, hint="0 drops the squared log-ratio penalty")
        check_aggregation(self.name, c.aggregation)

    def policy_term(self, batch: TokenBatch) -> Term:
        c = self.config
        adv = batch.token_advantages()  # 0 at masked positions: so is the policy term whatever `outside` is there
        log_r = masked_log_ratio(batch)
        r = ratio(log_r)
        lp = batch.logprobs.detach()
        old = lp if batch.old_logprobs is None else batch.old_logprobs.to(lp.dtype)
        # p ≤ 1: a log-probability above 0 is read as 0, so exp never overflows and the difference is never inf − inf;
        # the raw fields (garbage at masked positions only reaches a flag multiplied by A = 0 there)
        moved = (lp.clamp(max=0.0).exp() - old.clamp(max=0.0).exp()).abs()
        outside = moved > c.threshold
        # "0 where outside, else r·A" by multiplication with the kept flags: a dropped token's gradient is exactly 0
        policy = (c.adv_tau * r) * (adv * ~outside)
        term = policy - c.kl_tau * log_r.square()
        return Term(term, ratio=r, saved=dict(log_r=log_r, moved=moved, outside=outside))

    def term_metrics(self, batch: TokenBatch, term: Term) -> dict[str, torch.Tensor]:
        s, mask = term.saved, batch.mask
        log_r = s["log_r"].detach()
        metrics = policy_metrics(batch, log_r)
        metrics["ipo/masked_fraction"] = masked_fraction(s["outside"], mask)
        metrics["ipo/prob_diff_max"] = masked_max(s["moved"], mask)
        metrics["log_ratio/staleness_sq_mean"] = masked_mean(log_r.square(), mask)
        return metrics


register("prime-ipo", PrimeIPO)
register("ipo", PrimeIPO)
