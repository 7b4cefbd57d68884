"""GSPO and GSPO-token: the PPO-clip surrogate on the length-normalised *sequence* ratio.

Zheng et al., "Group Sequence Policy Optimization" (arXiv 2507.18071). With s_i = exp(Σ_t m(lp − old) / |y_i|)
the geometric mean of the token ratios of sequence i::

    gspo        term_i  = min(s_i·A_i, clip(s_i, 1 − ε_low, 1 + ε_high)·A_i)      loss = −Σ_i term_i / N_seq
    gspo-token  term_it = min(s_it·A_it, clip(s_it)·A_it),  s_it = sg(s_i)·exp(lp − sg(lp))
                                                            loss = −Σ_i (1/|y_i|) Σ_t m·term_it / N_seq

Defaults ε_low = 3e-4, ε_high = 4e-4 (the ratio is a per-token geometric mean, so the band is narrow).
∇_lp gspo = s_i·A_i·m/|y_i| / N_seq where unclipped; gspo-token has the same gradient when A_it = A_i, and lets the
advantage vary per token. ``gspo`` takes A_i as given for ``[B]`` advantages; for ``[B, T]`` advantages it uses their
mean over the sequence's unmasked tokens. The optional training–inference ``correction`` must be sequence- or
geometric-level for ``gspo`` (a token weight has no place in a sequence term); any level works for ``gspo-token``.

Reduces to: with one token per sequence, ``gspo`` is GRPO's clipped surrogate (same ε); on-policy (s = 1) both are
length-normalised REINFORCE.

Example:
    >>> out = pgzoo.get("gspo")(pgzoo.TokenBatch(logprobs=lp, mask=m, advantages=a, old_logprobs=old))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pgzoo.batch import TokenBatch
from pgzoo.objectives.correction import Correction
from pgzoo.objectives.diagnostics import clip_metrics, masked_mean, policy_metrics
from pgzoo.errors import ConfigError
from pgzoo.objectives.base import Objective, Term, check_eps, log_bounds, ppo_clip_flags
from pgzoo.objectives.grpo import clipped_surrogate
from pgzoo.objectives.ratios import MAX_LOG_RATIO, ratio
from pgzoo.objectives.registry import register
from pgzoo.objectives.shaping import shaped


class GSPO(Objective):
    """GSPO (arXiv 2507.18071): sequence-level clipped surrogate on s_i = (π_θ/π_θold)^(1/|y_i|).

    Config:
        eps_low, eps_high: clip range of the sequence ratio (3e-4, 4e-4).
        token_level: False → ``gspo`` (one term per sequence); True → ``gspo-token`` (per-token advantages).
        correction: optional training–inference correction (sequence or geometric level for ``gspo``).
        beta, kl, ...: the loss-shaping options of :mod:`pgzoo.objectives.shaping`. On ``gspo``'s sequence term the
            KL enters as the row's mean KL, the off-policy mask per sequence; ``top_entropy_quantile`` is refused
            (no token term to drop; ``gspo-token`` takes it).
    """

    @shaped
    @dataclass(frozen=True)
    class Config:
        eps_low: float = 3e-4
        eps_high: float = 4e-4
        token_level: bool = False
        correction: Correction | None = None

    default_advantage = "group-mean-std"
    paper = "Group Sequence Policy Optimization (arXiv 2507.18071)"

    def _check_config(self) -> None:
        c = self.config
        check_eps(type(self).__name__, c.eps_low, c.eps_high)
        if c.correction is not None and c.correction.level == "token" and not c.token_level:
            raise ConfigError(
                f"{self.name}: correction.level='token' does not apply to a sequence-level term; "
                "use level='sequence' or 'geometric' (or the objective 'gspo-token')"
            )

    def term_level(self) -> str:
        return "token" if self.config.token_level else "sequence"

    def aggregation_mode(self) -> str:
        return "seq-mean-token-mean"  # gspo-token; gspo's sequence term is averaged over sequences (seq-mean)

    def policy_term(self, batch: TokenBatch) -> Term:
        c = self.config
        lp = batch.masked(batch.logprobs)
        log_r = lp - batch.clean("old_logprobs")
        lengths = batch.seq_lengths().clamp_min(1.0)
        log_s = (log_r.sum(-1) / lengths).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)  # [B], with gradient
        lo, hi = log_bounds(c.eps_low, c.eps_high)
        if c.token_level:
            adv = batch.token_advantages()
            log_s_tok = log_s.detach()[:, None] + (lp - lp.detach())  # value log s_i, gradient of lp
            low, high = ppo_clip_flags(log_s.detach()[:, None].expand_as(adv), adv, lo, hi)
            s_tok = ratio(log_s_tok)
            term = clipped_surrogate(s_tok, adv, low, high, c.eps_low, c.eps_high)
            return Term(term, lp=lp, ratio=s_tok,
                        saved=dict(log_r=log_r, log_s=log_s, low=low, high=high, where=batch.mask))
        adv = batch.advantages.to(lp.dtype)
        if adv.dim() == 2:  # per-token advantages: their mean over the sequence
            adv = batch.masked(adv).sum(-1) / lengths
        has_tokens = batch.has_tokens()
        adv = torch.where(has_tokens, adv, 0.0)
        low, high = ppo_clip_flags(log_s.detach(), adv, lo, hi)
        s = ratio(log_s)
        term = clipped_surrogate(s, adv, low, high, c.eps_low, c.eps_high)
        return Term(term, level="sequence", lp=lp, ratio=s, advantages=adv,
                    saved=dict(log_r=log_r, log_s=log_s, low=low, high=high, where=has_tokens))

    def term_metrics(self, batch: TokenBatch, term: Term) -> dict[str, torch.Tensor]:
        s = term.saved
        metrics = policy_metrics(batch, s["log_r"].detach())
        metrics["gspo/seq_ratio_mean"] = masked_mean(s["log_s"].detach().exp(), batch.has_tokens())
        metrics.update(clip_metrics(s["low"], s["high"], s["where"]))
        return metrics


register("gspo", GSPO)
register("gspo-token", GSPO, token_level=True)
