"""A*-PO: least-squares regression of the implicit reward β2·log(π_θ/π_ref) onto the optimal advantage r − V*.

A*-PO, "Accelerating RL for LLM Reasoning with Optimal Advantage Regression" (arXiv 2505.20686), as TRL
1.16 implements it (``trl.experimental.a2po``, ``A2POTrainer.compute_loss``). With Δ_i = Σ_t m·(lp − ref) the
sequence log-ratio of completion i against the reference policy and A_i = r_i − V*(x_i) its optimal advantage
(estimator ``a-star``, :mod:`pgzoo.advantages.outcome`)::

    e_i  = β2·Δ_i − A_i                      (implicit reward minus target)
    loss = Σ_i e_i² / N_seq                  (``seq-mean`` over the rows with a token)

∇_lp loss = 2·β2·e_i·m / N_seq on every token of row i: the policy is pulled up where its implicit reward is below
the advantage and down where above, towards π* ∝ π_ref·exp(r/β2). Default β2 = 1e-3 (TRL's ``A2POConfig.beta2``);
TRL's stage 1 estimates V*(x) = β1·log mean_j exp(r_j/β1) from reference-policy samples before training, pgzoo's
``a-star`` estimator from the group's own samples or from reference rewards the caller passes.

Rows and normalisers: a row without a token has Δ_i = 0 and is left out (term exactly 0, not counted in N_seq);
TRL's completions always hold at least their first token, so its mean over the B rows is N_seq = B. The sum over
rows divided by the global ``num_sequences`` makes micro-batches add up to the mini-batch (shard-additive).
Advantages ``[B, T]`` enter as their mean over the row's unmasked tokens (a per-sequence advantage broadcast over
tokens gives it back exactly), as ``gspo`` takes them.

Options: the entropy bonus (``entropy_coef``) adds to the regression as it does to any loss. Refused, by name:
``beta`` (a second KL penalty towards the same π_ref that β2 already ties the policy to), ``off_policy_mask_threshold``
(it drops negative-advantage samples, biasing a regression that needs both signs), ``top_entropy_quantile`` (no token
term to drop) and ``correction`` (no policy-gradient estimator to de-bias: the target r − V* does not depend on the
sampling policy, and neither the paper nor TRL weights it).

Reduces to: with one token per sequence, a per-token squared regression of β2·(lp − ref) onto A.

Example:
    >>> out = pgzoo.get("a-star-po")(pgzoo.TokenBatch(logprobs=lp, mask=m, advantages=a, ref_logprobs=ref))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pgzoo.batch import TokenBatch
from pgzoo.errors import ConfigError
from pgzoo.objectives.base import Objective, Term
from pgzoo.objectives.diagnostics import masked_mean, policy_metrics
from pgzoo.objectives.registry import register
from pgzoo.objectives.shaping import shaped
from pgzoo.validate import check_number


class AStarPO(Objective):
    """A*-PO (arXiv 2505.20686): (β2·Σ_t m·(lp − ref) − A_i)², averaged over sequences.

    Config:
        beta2: β2 > 0, the KL coefficient of the regularised objective whose optimal policy the regression fits
            (TRL's ``A2POConfig.beta2``, 1e-3).
        entropy_coef: the entropy bonus of :mod:`pgzoo.objectives.shaping`; the other shaping options are refused
            (module docstring).
    """

    @shaped
    @dataclass(frozen=True)
    class Config:
        beta2: float = 1e-3

    requires = frozenset({"ref_logprobs"})
    default_advantage = "a-star"
    aggregation = "seq-mean"
    paper = "Accelerating RL for LLM Reasoning with Optimal Advantage Regression (arXiv 2505.20686)"

    @classmethod
    def validate_overrides(cls, overrides: dict[str, Any]) -> None:
        if "correction" in overrides:
            raise ConfigError(
                "a-star-po: correction weights a policy-gradient term by π_θold/μ, but A*-PO regresses the implicit "
                "reward onto r − V*, a target that does not depend on the sampling policy (neither the paper nor "
                "TRL's A2POTrainer weights it): drop correction")
        super().validate_overrides(overrides)

    def _check_config(self) -> None:
        check_number(f"{self.name}: beta2", self.config.beta2, low=0.0, low_open=True,
                     hint="TRL's A2POConfig.beta2 is 1e-3; the regression target is A*/β2 in log-probability units")

    def term_level(self) -> str:
        return "sequence"

    def check_shaping(self) -> None:
        super().check_shaping()
        c = self.shaping
        if c.beta > 0:
            raise ConfigError(
                f"{self.name}: beta={c.beta!r} adds a KL penalty towards π_ref, but A*-PO's regression already ties "
                "π_θ to π_ref: β2 is the KL coefficient of the objective it solves; leave beta=0 and set beta2")
        if c.off_policy_mask_threshold is not None:
            raise ConfigError(
                f"{self.name}: off_policy_mask_threshold={c.off_policy_mask_threshold!r} drops samples with a "
                "negative advantage, but A*-PO's least-squares fit needs both signs (dropping one biases the implicit "
                "reward upwards); leave off_policy_mask_threshold=None")

    def policy_term(self, batch: TokenBatch) -> Term:
        lp = batch.masked(batch.logprobs)
        has_tokens = batch.has_tokens()
        implicit = self.config.beta2 * (lp - batch.clean("ref_logprobs")).sum(-1)  # [B], 0 on rows without a token
        adv = batch.advantages.to(lp.dtype)
        if adv.dim() == 2:  # per-token advantages: their mean over the sequence
            adv = batch.masked(adv).sum(-1) / batch.seq_lengths().clamp_min(1.0)
        adv = torch.where(has_tokens, adv, 0.0)
        error = implicit - adv
        return Term(-error.square(), level="sequence", lp=lp, advantages=adv,
                    saved=dict(implicit=implicit, error=error, advantages=adv))

    def term_metrics(self, batch: TokenBatch, term: Term) -> dict[str, torch.Tensor]:
        s, rows = term.saved, batch.has_tokens()
        metrics = policy_metrics(batch)
        metrics["astar_po/implicit_reward_mean"] = masked_mean(s["implicit"], rows)
        metrics["astar_po/advantage_mean"] = masked_mean(s["advantages"], rows)
        metrics["astar_po/sq_error_mean"] = masked_mean(s["error"].square(), rows)
        return metrics


register("a-star-po", AStarPO)
register("a2po", AStarPO)
