"""SAPO: the PPO ratio behind a soft sigmoid gate instead of a hard clip.

Gao et al., "Soft Adaptive Policy Optimization" (arXiv 2511.20347), as TRL's ``loss_type="sapo"``. Per token, with
r = exp(lp − old) (or the sequence ratio at ``importance_sampling_level="sequence"``) and a temperature τ that
depends on the advantage's sign::

    term = g(r)·A,    g(r) = σ(τ·(r − 1)) · 4/τ,    τ = τ_pos if A > 0 else τ_neg
    loss = −Σ_i (1/|y_i|) Σ_t m·term / N_seq        (TRL aggregates ``sapo`` like ``grpo``)

so ∇_lp term = 4·σ(1 − σ)·r·A: exactly r·A = A at r = 1, decaying smoothly (never to a hard zero) as r leaves 1,
faster for larger τ. Defaults are TRL's: τ_pos = 1.0, τ_neg = 1.05. The optional training–inference ``correction``
weights the policy term; the loss-shaping options are those of :mod:`pgzoo.objectives.shaping`.

Shapes: ``logprobs``/``old_logprobs`` ``[B, T]``; advantages ``[B]`` or ``[B, T]``.

Reduces to: on-policy (r = 1) length-normalised REINFORCE, the same gradient as ``grpo`` on-policy; as τ → 0 the
gate's gradient factor 4σ(1 − σ)·r tends to r, the unclipped PPO ratio.

Example:
    >>> out = pgzoo.get("sapo")(pgzoo.TokenBatch(logprobs=lp, mask=m, advantages=a, old_logprobs=old))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pgzoo.batch import TokenBatch
from pgzoo.objectives.correction import Correction
from pgzoo.objectives.diagnostics import masked_mean, policy_metrics
from pgzoo.errors import ConfigError
from pgzoo.objectives.base import ROW_SUM_MODES, Objective, Term, check_aggregation
from pgzoo.objectives.ratios import importance_log_ratio, ratio
from pgzoo.objectives.shaping import shaped, check_is_level
from pgzoo.objectives.registry import register


class SAPO(Objective):
    """SAPO (arXiv 2511.20347): σ(τ(r − 1))·(4/τ)·A, τ by the sign of A.

    Config:
        temperature_pos: τ for A > 0 (1.0). temperature_neg: τ for A ≤ 0 (1.05).
        importance_sampling_level: ``token`` (default) or ``sequence`` (the row's geometric-mean ratio).
        aggregation: ``seq-mean-token-mean`` (or any token-level mode of :func:`pgzoo.aggregate`).
        correction: optional training–inference correction of the policy term.
        beta, kl, ...: the loss-shaping options of :mod:`pgzoo.objectives.shaping`.
    """

    @shaped
    @dataclass(frozen=True)
    class Config:
        bias_correction_kl: bool = True  # TRL's use_bias_correction_kl default (with β > 0)
        temperature_pos: float = 1.0
        temperature_neg: float = 1.05
        importance_sampling_level: str = "token"
        aggregation: str = "seq-mean-token-mean"
        correction: Correction | None = None

    default_advantage = "group-mean-std"
    paper = "Soft Adaptive Policy Optimization (arXiv 2511.20347)"

    def _check_config(self) -> None:
        c = self.config
        for key in ("temperature_pos", "temperature_neg"):
            v = getattr(c, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ConfigError(f"{self.name}: {key}={v!r} must be a positive number (TRL: 1.0 and 1.05)")
        check_is_level(self.name, c.importance_sampling_level)
        check_aggregation(self.name, c.aggregation)

    def policy_term(self, batch: TokenBatch) -> Term:
        c = self.config
        lp = batch.masked(batch.logprobs)
        pos, neg = (torch.tensor(v, dtype=lp.dtype, device=lp.device) for v in (c.temperature_pos,
                                                                              c.temperature_neg))
        log_r = importance_log_ratio(batch, lp, c.importance_sampling_level)
        r = ratio(log_r)
        if self._row_factored(batch):
            # [B] advantages, token-level ratio, nothing per-token: σ(x)·(4/τ)·A = (1 + tanh(x/2))·(2/τ)·A, and the
            # tanh part is exactly 0 at masked positions (r = 1), so Σ_t m·term = (2/τ_i)·A_i·(Σ_t tanh + |y_i|)
            # with τ and A per row: no [B, T] advantage or temperature tensors.
            adv_row = torch.where(batch.has_tokens(), batch.advantages.to(lp.dtype), 0.0)
            tau_row = torch.where(adv_row > 0, pos, neg)
            tanh = torch.tanh((r - 1.0) * (0.5 * tau_row)[:, None])
            row_sums = (tanh.sum(-1) + batch.seq_lengths()) * (2.0 / tau_row * adv_row)
            return Term(row_sums, level="rows", lp=lp, ratio=r, saved=dict(lp=lp, tanh=tanh))
        adv = batch.token_advantages()
        tau = torch.where(adv > 0, pos, neg)  # exact in lp's dtype
        scaled_adv = torch.div(4.0, tau).mul_(adv)  # (4/τ)·A, no gradient
        policy = torch.sigmoid((r - 1.0) * tau) * scaled_adv  # masked: A = 0 → term exactly 0
        return Term(policy, lp=lp, ratio=r, saved=dict(lp=lp, r=r, tau=tau))

    def term_metrics(self, batch: TokenBatch, term: Term) -> dict[str, torch.Tensor]:
        s = term.saved
        if term.level == "rows":
            gate_factor = 1.0 - s["tanh"].detach().square()
        else:
            sig = torch.sigmoid(s["tau"] * (s["r"].detach() - 1.0))
            gate_factor = 4.0 * sig * (1.0 - sig)
        metrics = policy_metrics(batch, s["lp"].detach() - batch.clean("old_logprobs"))
        # the factor multiplying r·A in the gradient: 1 on-policy, → 0 far off-policy
        metrics["sapo/gate_mean"] = masked_mean(gate_factor, batch.mask)
        return metrics

    def _row_factored(self, batch: TokenBatch) -> bool:
        c = self.config
        return (batch.advantages.dim() == 1 and c.importance_sampling_level == "token" and c.correction is None
                and c.top_entropy_quantile == 1 and c.off_policy_mask_threshold is None
                and c.aggregation in ROW_SUM_MODES)


register("sapo", SAPO)
