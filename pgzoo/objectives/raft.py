"""RAFT++: reward-ranked fine-tuning with PPO's clipped importance weight — the PPO-clip surrogate on the raw
reward, so only the correct samples (reward 1) move the policy.

Xiong et al., "A Minimalist Approach to LLM Reasoning: from Rejection Sampling to Reinforce" (arXiv 2504.11343), as
ROLL runs it (its RAFT++ recipe: ``adv_estimator: grpo`` with ``norm_mean_type`` and ``norm_std_type`` unset, so the
advantage is the reward itself; ``loss_agg_mode: seq-mean-token-mean``; ``dual_clip_loss: true``). Per token,
r = exp(lp − old), A = the reward (estimator ``reward``)::

    term = min(r·A, clip(r, 1 − ε_low, 1 + ε_high)·A), for A < 0 at least c·A (dual clip, c = 1 + 2ε)
    loss = −Σ_i (1/|y_i|) Σ_t m·term / N_seq

Defaults: ε 0.2/0.2 (ROLL's ``pg_clip``), ``clip_c`` c = 1.4 (ROLL's dual-clip bound 1 + 2·pg_clip; it never acts
on rewards ≥ 0), ``seq-mean-token-mean``, advantage ``reward``. With 0/1 rewards the incorrect samples have A = 0 and
contribute nothing: rejection sampling, with PPO's clip keeping the accepted samples' update near π_θold.

The paper averages over the tokens of the accepted samples only; ROLL, and pgzoo, average per sequence over every
sequence of the batch (a rejected sample counts in N_seq). It is the ``grpo`` class (:mod:`pgzoo.objectives.grpo`)
with these defaults, so it takes every option of that class.

Example:
    >>> out = pgzoo.get("raft++")(pgzoo.TokenBatch(logprobs=lp, mask=m, advantages=rewards, old_logprobs=old))
"""

from __future__ import annotations

from pgzoo.objectives.grpo import GRPO
from pgzoo.objectives.registry import register

register("raft++", GRPO, clip_c=1.4, default_advantage="reward",
         paper="A Minimalist Approach to LLM Reasoning: from Rejection Sampling to Reinforce (arXiv 2504.11343)")
