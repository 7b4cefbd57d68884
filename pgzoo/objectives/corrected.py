"""OpenRLHF's named train/rollout corrections as objectives: PPO-clip with the IcePop or seq-mask-tis weight.

OpenRLHF 0.11.2 (``PolicyLoss``, ``--algo.advantage.is_correction_*``) names three schemes of the per-token ratio
ρ_it = exp(old − mu) = π_train/π_rollout, with its default band [low, high] = [0.5, 5]:

    TIS           level token, mode clip:  c_it = clamp(ρ_it, low, high)
    ICEPOP        level token, mode mask:  c_it = ρ_it · 1[low ≤ ρ_it ≤ high]
    seq-mask-tis  level seq,   mode mask:  c_it = ρ_it · 1[low ≤ g_i ≤ high],   g_i = exp(Σ_t m·log ρ_it / |y_i|)

and multiplies the PPO-clip loss by c (``loss = coef * loss``), token-mean (``token_level_loss=True``), ε 0.2/0.2.
pgzoo's :class:`~pgzoo.objectives.correction.Correction` expresses ICEPOP as it is
(``level="token", mode="mask", low=0.5, high=5``: the presets ``correction="icepop"``) and seq-mask-tis with the
``mask_level`` option (``level="token", mode="mask", mask_level="geometric"``: ``correction="seq-mask-tis"``): the
gate is read on the geometric mean while every kept token keeps its own ratio — a sequence-level correction weight
(``level="geometric"``) would instead put g_i on every token. OpenRLHF's TIS clamps from below too (to 0.5 by
default) where pgzoo's ``truncate`` (Yao et al.'s TIS, verl's, slime's) only caps from above; it is not registered.

    icepop        min(r·A, clip(r)·A) · ρ_it·1[0.5 ≤ ρ_it ≤ 5]                  token-mean, ε 0.2/0.2
    seq-mask-tis  min(r·A, clip(r)·A) · ρ_it·1[0.5 ≤ g_i ≤ 5]                   token-mean, ε 0.2/0.2

IcePop: the Ring-1T report (inclusionAI, "Every Step Evolves: Scaling Reinforcement Learning for Trillion-Scale
Thinking Model", arXiv 2510.18855), band [α, β] = [0.5, 5]. Both names are registrations of :class:`GRPO`; any
objective that takes a correction takes the presets too (``pgzoo.get("cispo", correction="icepop")``).
"""

from __future__ import annotations

from pgzoo.objectives.grpo import GRPO
from pgzoo.objectives.registry import register

register("icepop", GRPO, aggregation="token-mean", correction="icepop",
         paper="IcePop, Ring-1T report (arXiv 2510.18855); OpenRLHF's ICEPOP correction on PPO-clip")
register("seq-mask-tis", GRPO, aggregation="token-mean", correction="seq-mask-tis",
         paper="OpenRLHF's seq-mask-tis correction on PPO-clip (Yao et al., 'Your Efficient RL Framework Secretly "
               "Brings You Off-Policy RL Training', 2025)")
