"""GMPO: the PPO surrogate on the geometric mean of the token ratios, clipped per token in log space.

Zhao et al., "Geometric-Mean Policy Optimization" (arXiv 2507.20673), as verl 0.9.1 implements it
(``policy_loss.loss_mode=geo_mean``). Per sequence i, with lr_it = lp − old, σ_it = sign(A_it)::

    lr'_it = σ·min(σ·lr, σ·clamp(lr, −ε_low, ε_high))   (A > 0: lr capped at ε_high; A < 0: floored at −ε_low;
                                                           A = 0: 0)
    s_i    = exp(Σ_t m·lr'_it / |y_i|)                   (the clipped geometric mean of r_it)
    Ā_i    = Σ_t m·A_it / |y_i|
    loss   = −Σ_i Ā_i·s_i / N_seq

A token whose lr' sits at its bound carries no gradient; every other token of the sequence gets
∇_lp = −Ā_i·s_i/(|y_i|·N_seq). Defaults are verl's actor defaults, ε_low = ε_high = 0.2 (the paper's e^±0.4 band is
``eps_low=0.4, eps_high=0.4``). The clip flags follow the advantage's sign per token, the objective uses the
sequence's mean advantage (verl supports sequence-level advantages only; with per-token ones this is its formula).
The sequence log-ratio is clamped to ±20 as everywhere in pgzoo. verl averages over all B rows, fully masked
ones included; pgzoo over N_seq (rows with a token) — pass ``num_sequences=B`` for verl's count. An optional
``correction`` must be sequence- or geometric-level (a weight per sequence).

Reduces to: with one token per sequence, ``grpo``'s clipped surrogate in log space (bounds e^−ε_low, e^ε_high); on
policy, length-normalised REINFORCE (the gradient of ``gspo``).

Example:
    >>> out = pgzoo.get("gmpo")(pgzoo.TokenBatch(logprobs=lp, mask=m, advantages=a, old_logprobs=old))
"""

from __future__ import annotations

from dataclasses import dataclass

from pgzoo.batch import TokenBatch
from pgzoo.objectives.correction import Correction
from pgzoo.objectives.diagnostics import clip_metrics, masked_mean, policy_metrics
from pgzoo.errors import ConfigError
import torch

from pgzoo.objectives.base import Objective, Term, ppo_clip_flags
from pgzoo.objectives.ratios import MAX_LOG_RATIO
from pgzoo.objectives.registry import register
from pgzoo.objectives.shaping import shaped


class GMPO(Objective):
    """GMPO (arXiv 2507.20673): −Ā_i·exp(mean_t clip_sign(lp − old)), averaged over sequences.

    Config:
        eps_low, eps_high: log-space clip range of each token's log-ratio (0.2, 0.2: verl's defaults).
        correction: optional training–inference correction (sequence or geometric level).
        beta, kl, ...: the loss-shaping options of :mod:`pgzoo.objectives.shaping`, at sequence level as for ``gspo``
            (the KL as the row's mean, ``bias_correction_kl`` with the unclipped geometric-mean ratio);
            ``top_entropy_quantile`` is refused (no token term to drop).
    """

    @shaped
    @dataclass(frozen=True)
    class Config:
        eps_low: float = 0.2
        eps_high: float = 0.2
        correction: Correction | None = None

    default_advantage = "group-mean-std"
    paper = "Geometric-Mean Policy Optimization (arXiv 2507.20673)"

    def _check_config(self) -> None:
        c = self.config
        for key in ("eps_low", "eps_high"):  # log-space bounds: any number >= 0 (no "< 1" rule as for ratios)
            value = getattr(c, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ConfigError(f"GMPO: {key}={value!r} must be a number >= 0 (a log-space clip bound)")
        if c.correction is not None and c.correction.level == "token":
            raise ConfigError(f"{self.name}: correction.level='token' does not apply to a sequence-level term; "
                              "use level='sequence' or 'geometric'")

    def term_level(self) -> str:
        return "sequence"

    def policy_term(self, batch: TokenBatch) -> Term:
        c = self.config
        lp = batch.masked(batch.logprobs)
        adv = batch.token_advantages()
        log_r = lp - batch.clean("old_logprobs")
        low, high = ppo_clip_flags(log_r.detach(), adv, -c.eps_low, c.eps_high)
        # lr' = lr where kept, the crossed bound where clipped, 0 where A = 0 (sign 0) or masked; no 0·inf: lr finite
        kept = ~(low | high) & (adv != 0)
        bound = high.to(lp.dtype) * c.eps_high - low.to(lp.dtype) * c.eps_low
        lengths = batch.seq_lengths().clamp_min(1.0)
        log_s = ((log_r * kept + bound).sum(-1) / lengths).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
        s = log_s.exp()
        seq_adv = adv.sum(-1) / lengths  # 0 for fully masked rows
        # the KL's bias correction (Objective.kl_ratio) takes the unclipped geometric mean of the token ratios
        return Term(seq_adv * s, level="sequence", lp=lp, advantages=seq_adv,
                    saved=dict(log_r=log_r, s=s, low=low, high=high))

    def term_metrics(self, batch: TokenBatch, term: Term) -> dict[str, torch.Tensor]:
        s = term.saved
        metrics = policy_metrics(batch, s["log_r"].detach())
        metrics["gmpo/seq_ratio_mean"] = masked_mean(s["s"].detach(), batch.has_tokens())
        metrics.update(clip_metrics(s["low"], s["high"], batch.mask))
        return metrics


register("gmpo", GMPO)
