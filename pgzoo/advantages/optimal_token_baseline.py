"""The Optimal Token Baseline (OTB): a per-token baseline for each group, weighted by each path's gradient energy.

Li, Xu, Li et al., "The Optimal Token Baseline: Variance Reduction for Long-Horizon LLM-RL" (PMLR vol. 306), as
verl 0.9.1 computes it (``compute_optimal_token_baseline_advantage``, ``algorithm.adv_estimator=
optimal_token_baseline``). The variance-minimising baseline of token t weights each completion by the squared norm
of its score up to t. The logit-gradient proxy estimates that norm from forward-pass probabilities alone: at a token
y_j sampled with probability π_j, the gradient of log π_j with respect to the logits is e_{y_j} − π, of squared norm

    w_j = ‖e_{y_j} − π‖² = 1 − 2·π_j + Σ_v π_v²          (Σπ²: the sum of squared probabilities over the vocabulary)

With W_it = Σ_{j ≤ t} m_ij·w_ij (optionally w_ij·ρ_ij², ρ the rollout importance weights) and G_it the return of
token t (the outcome reward r_i at every response token), the baseline of group g at position t and the advantage:

    B_gt = Σ_{i∈g} G_it·W_it·m_it / (Σ_{i∈g} W_it·m_it + eps)
    A_it = (G_it − B_{g(i)t})·m_it

As verl: a group of one has no baseline (its advantage is its return, r_i at every token), and with
``handle_zero_tail`` the longest completion of a group, where it is longer than every other, has baseline 0 from
column ℓ₂ on (ℓ₂ the runner-up's token count): past the other completions the weighted mean would be its own
return and its advantage 0. A constant group's advantage is therefore not exactly 0 (r·eps/(ΣW + eps) before the
tail, r on it).
"""

from __future__ import annotations

import torch

from pgzoo.advantages.base import register
from pgzoo.advantages.stats import check_eps, group_sum
from pgzoo.advantages.token_returns import discounted_returns
from pgzoo.errors import ConfigError


def path_energy(old_logprobs: torch.Tensor, sum_pi_squared: torch.Tensor, mask: torch.Tensor,
                rollout_is_weights: torch.Tensor | None = None) -> torch.Tensor:
    """``[N, T]``: W_t = Σ_{j ≤ t} m_j·(1 − 2·π_j + Σπ²_j)·ρ_j², the cumulative logit-gradient proxy (ρ = 1 without
    rollout importance weights)."""
    w = 1.0 - 2.0 * torch.exp(old_logprobs) + sum_pi_squared
    if rollout_is_weights is not None:
        w = w * rollout_is_weights ** 2
    return (w * mask).cumsum(-1)


def lone_longest(lengths: torch.Tensor, index: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: whether it is its group's only longest completion (in a group of two or more), and the group's
    runner-up token count ℓ₂ (the largest among the other rows)."""
    zeros = torch.zeros(num_groups, dtype=lengths.dtype, device=lengths.device)
    longest = zeros.scatter_reduce(0, index, lengths, "amax", include_self=False)[index]
    at_max = lengths == longest
    how_many = group_sum(at_max.to(lengths.dtype), index, num_groups)[index]
    others = torch.where(at_max, torch.zeros_like(lengths), lengths)
    runner_up = zeros.scatter_reduce(0, index, others, "amax", include_self=True)[index]
    size = group_sum(torch.ones_like(lengths), index, num_groups)[index]
    return at_max & (how_many == 1) & (size >= 2), runner_up


def optimal_token_baseline(rewards, index, num_groups, *, response_mask=None, old_logprobs=None, sum_pi_squared=None,
                           rollout_is_weights=None, handle_zero_tail: bool = True, eps: float = 1e-8):
    """OTB: A_it = G_it − Σ_g G·W / (Σ_g W + eps) at each position t, W the cumulative logit-gradient proxy.

    Li et al., "The Optimal Token Baseline: Variance Reduction for Long-Horizon LLM-RL" (PMLR 306); verl's
    ``optimal_token_baseline`` (its actor computes Σπ² with ``actor.calculate_sum_pi_squared=true``). Per-token
    inputs ``[N, T]``: ``response_mask``, ``old_logprobs`` (log π_θold of the sampled tokens), ``sum_pi_squared``
    (Σ_v π_θold(v)² at each position, after temperature, as the log-probs) and optionally ``rollout_is_weights``
    (ρ, squared into W). Formula, conventions and the zero tail: :mod:`pgzoo.advantages.optimal_token_baseline`.
    """
    check_eps(eps)
    if not isinstance(handle_zero_tail, bool):
        raise ConfigError(f"advantages: handle_zero_tail={handle_zero_tail!r} must be True or False")
    missing = [k for k, v in (("response_mask", response_mask), ("old_logprobs", old_logprobs),
                              ("sum_pi_squared", sum_pi_squared)) if v is None]
    if missing:
        raise ConfigError(f"advantage estimator 'optimal-token-baseline' needs the per-token [N, T] inputs "
                          f"{', '.join(missing)} (response_mask, old_logprobs: log π_θold of the sampled tokens, "
                          f"sum_pi_squared: Σπ² over the vocabulary at each position)")
    mask = response_mask
    returns = discounted_returns(rewards, mask, 1.0)
    energy = path_energy(old_logprobs, sum_pi_squared, mask, rollout_is_weights) * mask
    baseline = (group_sum(returns * energy, index, num_groups) / (group_sum(energy, index, num_groups) + eps))[index]
    size = group_sum(torch.ones_like(rewards), index, num_groups)[index]
    baseline = torch.where((size >= 2)[:, None], baseline, torch.zeros_like(baseline))
    if handle_zero_tail:
        tail, runner_up = lone_longest(mask.sum(-1), index, num_groups)
        columns = torch.arange(mask.shape[1], device=mask.device, dtype=mask.dtype)
        baseline = torch.where(tail[:, None] & (columns[None] >= runner_up[:, None]), torch.zeros_like(baseline),
                               baseline)
    return (returns - baseline) * mask


optimal_token_baseline.token_inputs = ("response_mask", "old_logprobs", "sum_pi_squared", "rollout_is_weights")
# the trainer computes π_θold after the advantages, only off-policy, and never Σπ²
optimal_token_baseline.inputs = ("old_logprobs", "sum_pi_squared")
register("optimal-token-baseline")(optimal_token_baseline)

__all__ = ["optimal_token_baseline", "path_energy", "lone_longest"]
