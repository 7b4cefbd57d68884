"""The outcome estimators: the outcome rewards of G completions per prompt → one advantage per completion.

With r_i the reward of completion i, g(i) its group (the prompt it answers), mean_g / std_g the group's mean and
standard deviation (unbiased, as TRL and verl compute it), G_g its size and l_i its length in tokens:

- ``group-mean``              r_i − mean_g                                  (Dr. GRPO; MiniRL)
- ``group-mean-std``          (r_i − mean_g) / (std_g + eps)                (GRPO)
- ``leave-one-out``, ``rloo``  r_i − mean_{j∈g, j≠i} r_j = G_g/(G_g − 1)·(r_i − mean_g)   (RLOO)
- ``reinforce++``             (r_i − mean_B) / sqrt(var_B + eps), B the whole batch     (REINFORCE++);
                              with gamma < 1 per token: the discounted return γ^(tokens after t)·r_i, whitened
                              over the batch's response tokens (needs ``response_mask``)
- ``reinforce++-baseline``    the same whitening of r_i − mean_g            (REINFORCE++)
- ``opo``                     r_i − Σ_{j∈g} l_j r_j / Σ_{j∈g} l_j (needs ``lengths``)   (OPO)
- ``gpg``                     α·(r_i − mean_g)/f_norm, α = N / #{j : r_j ≠ 0}         (GPG)
- ``grpo-passk``              the group's best: (r_max − r_second)/(std_g + eps); others 0   (Pass@k, as verl)
- ``pass-at-k``               the closed-form pass@k advantage of 0/1 rewards, option k   (Pass@k Training)
- ``gdpo``                    Σ_k w_k·group-mean-std(r_k), whitened over the batch, option components [N, K]  (GDPO)
- ``remax``                   r_i − b_i, b_i the reward of a greedy rollout of i's prompt (option baseline_rewards)
                              (ReMax)
- ``reward``                  r_i, no baseline                              (RAFT++ in ROLL; TOPR)
- ``group-mean-batch-std``    (r_i − mean_g) / (std_B + eps), std_B over the whole batch   (TRL scale_rewards="batch")
- ``maxrl``                   (r_i − mean_g) / (mean_g + eps), rewards ≥ 0    (MaxRL)
- ``a-star``                  r_i − β1·log mean_{j∈g} exp(r_j/β1), or over reference rewards (option
                              reference_rewards [N, n])                     (A*-PO)

Each estimator's docstring gives its paper and its verl counterpart.

The batch statistics of ``reinforce++`` / ``reinforce++-baseline`` weight every completion by its length when
``lengths`` is given (verl whitens over tokens) and equally otherwise; the variance is unbiased.

A group whose rewards are all equal gets exactly zero advantage (never NaN), and so does a group of one — for every
estimator but the two batch-whitened ones, where the baseline is the batch (verl's convention; a group of one
is a baseline-free sample to verl's group estimators, a zero here).
"""

from __future__ import annotations

import math

import torch

from pgzoo.advantages.base import register
from pgzoo.advantages.stats import check_eps, group_stats, group_sum, whiten, zero_where
from pgzoo.advantages.token_returns import discounted_returns, whiten_tokens
from pgzoo.errors import ConfigError
from pgzoo.validate import check_int, check_number


@register("group-mean")
def group_mean(rewards, index, num_groups):
    """A_i = r_i − mean_g. Dr. GRPO (Liu et al., arXiv 2503.20783); MiniRL (arXiv 2512.01374)."""
    _, centred, _, constant = group_stats(rewards, index, num_groups)
    return zero_where(constant, centred)


@register("group-mean-std")
def group_mean_std(rewards, index, num_groups, *, eps: float = 1e-6):
    """A_i = (r_i − mean_g) / (std_g + eps), std unbiased. GRPO (Shao et al., "DeepSeekMath", arXiv 2402.03300)."""
    check_eps(eps)
    _, centred, std, constant = group_stats(rewards, index, num_groups)
    return zero_where(constant, centred / (std + eps))


def leave_one_out(rewards, index, num_groups):
    """A_i = r_i − mean of the other rewards of the group = G/(G−1)·(r_i − mean_g).

    RLOO: Ahmadian et al., "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human
    Feedback in LLMs" (arXiv 2402.14740); Kool et al., "Buy 4 REINFORCE Samples, Get a Baseline for Free!" (2019).
    Registered as ``leave-one-out`` and ``rloo``.
    """
    size, centred, _, constant = group_stats(rewards, index, num_groups)
    adv = centred * size / (size - 1).clamp_min(1.0)
    return zero_where(constant | (size < 2), adv)


register("leave-one-out")(leave_one_out)
register("rloo")(leave_one_out)


def reinforce_pp(rewards, index, num_groups, *, lengths=None, response_mask=None, eps: float = 1e-8,
                 gamma: float = 1.0):
    """REINFORCE++: the return whitened over the whole batch.

    Hu et al., "REINFORCE++: An Efficient RLHF Algorithm with Robustness to Both Prompt and Reward Models"
    (arXiv 2501.03262), as verl's ``compute_reinforce_plus_plus_outcome_advantage`` (``algorithm.gamma``).

    γ = 1 (the default): every token's return is the outcome reward r_i, so the advantage is one per completion,
    A_i = (r_i − mean_B) / sqrt(var_B + eps). With ``lengths`` the mean and unbiased variance are over tokens (each
    completion weighted by its length, as verl whitens the token returns); without, over completions.

    γ < 1: per token. The outcome reward sits on the last response token, so the return of response token t of row
    i is G_it = γ^k_it · r_i, k_it the number of response tokens after t (masked positions inside a row, e.g. tool
    output, are skipped, as verl's recursion carries the return across them); A_it = (G_it − mean) /
    sqrt(var + eps), mean and unbiased variance over every response token of the batch, and 0 at masked positions.
    Needs ``response_mask`` ``[N, T]``. Needs no groups.
    """
    check_eps(eps)
    gamma = check_number("advantages: gamma", gamma, low=0.0, high=1.0)
    if gamma == 1.0:
        weights = torch.ones_like(rewards) if lengths is None else lengths
        return whiten(rewards, weights, eps)
    if response_mask is None:
        raise ConfigError(f"advantage estimator 'reinforce++' with gamma={gamma} < 1 gives per-token discounted "
                          "returns: pass response_mask=[N, T] (1 at the completion's tokens)")
    return whiten_tokens(discounted_returns(rewards, response_mask, gamma), response_mask, eps)


reinforce_pp.uses_groups = False
reinforce_pp.token_inputs = ("response_mask",)
register("reinforce++")(reinforce_pp)


@register("reinforce++-baseline")
def reinforce_pp_baseline(rewards, index, num_groups, *, lengths=None, eps: float = 1e-8):
    """REINFORCE++-baseline: the group-mean-centred reward, whitened over the batch.

    A_i = whiten_B(r_i − mean_g) — Hu et al. (arXiv 2501.03262), as verl's
    ``compute_reinforce_plus_plus_baseline_outcome_advantage``: token-weighted statistics with ``lengths``,
    completion-weighted without (then a constant group is exactly 0 before whitening).
    """
    check_eps(eps)
    _, centred, _, constant = group_stats(rewards, index, num_groups)
    centred = zero_where(constant, centred)
    weights = torch.ones_like(rewards) if lengths is None else lengths
    return whiten(centred, weights, eps)


@register("opo")
def opo(rewards, index, num_groups, *, lengths=None):
    """OPO: the length-weighted group baseline, A_i = r_i − Σ_{j∈g} l_j r_j / Σ_{j∈g} l_j.

    Hao et al., "On-Policy RL with Optimal Reward Baseline" (arXiv 2505.23585): the optimal baseline under the
    assumption that the gradient norm grows with the sequence length. Needs ``lengths`` (verl:
    ``compute_opo_outcome_advantage``, lengths = response-mask sums).
    """
    if lengths is None:
        raise ConfigError("advantage estimator 'opo' weights the group baseline by response length: pass "
                          "lengths=[N] (completion lengths in tokens, e.g. completion_mask.sum(-1))")
    size, _, _, constant = group_stats(rewards, index, num_groups)
    baseline = group_sum(lengths * rewards, index, num_groups) / group_sum(lengths, index, num_groups)
    return zero_where(constant | (size < 2), rewards - baseline[index])


@register("gpg")
def gpg(rewards, index, num_groups, *, f_norm: float = 1.0):
    """GPG: A_i = α·(r_i − mean_g) / f_norm with α = N / max(1, #{j : r_j ≠ 0}) over the whole batch.

    Chu et al., "GPG: A Simple and Strong Reinforcement Learning Baseline for Model Reasoning" (arXiv 2504.02546).
    α rescales the batch gradient for the completions that carry signal; its definition and f_norm = 1 follow
    verl's ``compute_gpg_outcome_advantage``.
    """
    check_number("advantages: f_norm", f_norm, low=0.0, low_open=True)
    _, centred, _, constant = group_stats(rewards, index, num_groups)
    alpha = rewards.numel() / max(1, int(torch.count_nonzero(rewards)))
    return zero_where(constant, alpha * centred / f_norm)


@register("grpo-passk")
def grpo_passk(rewards, index, num_groups, *, eps: float = 1e-6, scale_std: bool = True):
    """Pass@k-style GRPO: only each group's best completion is credited, A = (r_max − r_second) / (std_g + eps).

    Every other completion gets 0; ``scale_std=False`` drops the division. As verl's
    ``compute_grpo_passk_outcome_advantage`` (after arXiv 2503.19595). Ties for the best give 0 (r_max = r_second);
    the credited row of a tie is the first.
    """
    check_eps(eps)
    if not isinstance(scale_std, bool):
        raise ConfigError(f"advantages: scale_std={scale_std!r} must be True or False")
    size, _, std, constant = group_stats(rewards, index, num_groups)
    # order rows by group, then reward descending (two stable sorts): each group's best row comes first, its
    # runner-up second, and a tie keeps the earlier row first
    by_reward = torch.sort(rewards, descending=True, stable=True).indices
    order = by_reward[torch.sort(index[by_reward], stable=True).indices]
    g, r = index[order], rewards[order]
    best = torch.ones_like(g, dtype=torch.bool)
    best[1:] = g[1:] != g[:-1]
    gap = torch.zeros_like(r)
    gap[:-1] = r[:-1] - r[1:]  # meaningful where the next row is of the same group (size >= 2 is checked below)
    credit = torch.where(best, gap, torch.zeros_like(gap))
    if scale_std:
        credit = credit / (std[order] + eps)
    adv = torch.zeros_like(rewards).index_copy(0, order, credit)
    return zero_where(constant | (size < 2), adv)


@register("pass-at-k")
def pass_at_k(rewards, index, num_groups, *, k: int = 1):
    """The pass@k advantage of binary rewards, in closed form over each group of N with N_neg failures.

    Chen et al., "Pass@k Training for Adaptively Balancing Exploration and Exploitation of Large Reasoning
    Models" (arXiv 2508.10751): with R̄ = 1 − C(N_neg, k)/C(N, k) the group's pass@k and σ = sqrt(R̄(1 − R̄)),
    A_pos = (1 − R̄)/σ and A_neg = (1 − R̄ − C(N_neg − 1, k − 1)/C(N − 1, k − 1))/σ. k = 1 is GRPO's advantage with
    the population std. Rewards must be 0/1; k at most the smallest group.
    """
    k = check_int("advantages: k", k, low=1)
    if not bool(((rewards == 0) | (rewards == 1)).all()):
        raise ConfigError("advantage estimator 'pass-at-k' needs binary rewards (0 or 1 per completion); "
                          "use grpo-passk or group-mean-std for graded rewards")
    size = group_sum(torch.ones_like(rewards), index, num_groups)
    if k > int(size.min()):
        raise ConfigError(f"advantages: k={k} exceeds the smallest group ({int(size.min())} completions); "
                          "pass k <= group size")
    neg = size - group_sum(rewards, index, num_groups)

    def ratio(top: torch.Tensor, bottom: torch.Tensor, m: int) -> torch.Tensor:
        # C(top, m)/C(bottom, m) = Π_{i<m} (top − i)/(bottom − i), zero once top < m
        i = torch.arange(m, dtype=rewards.dtype, device=rewards.device)
        return ((top[:, None] - i) / (bottom[:, None] - i)).clamp_min(0.0).prod(-1)

    mean = 1.0 - ratio(neg, size, k)
    sigma = torch.sqrt(mean * (1.0 - mean))
    a_pos = (1.0 - mean) / sigma
    a_neg = (1.0 - mean - ratio(neg - 1.0, size - 1.0, k - 1)) / sigma
    adv = torch.where(rewards > 0, a_pos[index], a_neg[index])
    return zero_where((sigma == 0)[index], adv)


@register("gdpo")
def gdpo(rewards, index, num_groups, *, components=None, weights=None, lengths=None, eps: float = 1e-6,
         scale_std: bool = True):
    """GDPO: each reward component normalised within its group on its own, the weighted sum whitened over the batch.

    Liu et al., "GDPO: Group reward-Decoupled Normalization Policy Optimization for Multi-reward RL Optimization"
    (arXiv 2601.05242). With r_k the ``[N]`` rewards of component k (``components[:, k]``) and w_k its weight::

        A_k = (r_k − mean_g(r_k)) / (std_g(r_k) + eps)        (group-mean-std per component; scale_std=False: r_k − mean_g)
        A   = whiten_B(Σ_k w_k · A_k)

    as verl's ``compute_gdpo_outcome_advantage`` (``algorithm.gdpo_reward_keys`` / ``gdpo_reward_weights``); the
    whitening is over tokens with ``lengths`` (verl's ``maskedwhiten`` over the response mask), over completions
    without. ``components=None`` takes ``rewards`` as the one component (GRPO followed by batch whitening). A group
    whose component is constant contributes zero for that component, a group of one too (verl keeps a lone
    completion's reward as its score there).
    """
    check_eps(eps)
    if not isinstance(scale_std, bool):
        raise ConfigError(f"advantages: scale_std={scale_std!r} must be True or False")
    parts = rewards[:, None] if components is None else torch.as_tensor(components, device=rewards.device)
    if parts.dim() != 2 or parts.shape[0] != rewards.shape[0]:
        raise ConfigError(f"advantage estimator 'gdpo': components must be [N={rewards.shape[0]}, K] (one column "
                          f"per reward component), got shape {tuple(parts.shape)}")
    parts = parts.to(rewards.dtype)
    if not bool(torch.isfinite(parts).all()):
        raise ConfigError("advantage estimator 'gdpo': components contain NaN or Inf; fix the reward components")
    w = torch.ones(parts.shape[1], dtype=rewards.dtype, device=rewards.device) if weights is None else \
        torch.as_tensor(weights, dtype=rewards.dtype, device=rewards.device)
    if w.shape != (parts.shape[1],):
        raise ConfigError(f"advantage estimator 'gdpo': weights must hold one number per component "
                          f"({parts.shape[1]}), got shape {tuple(w.shape)}")
    total = torch.zeros_like(rewards)
    for k in range(parts.shape[1]):
        size, centred, std, constant = group_stats(parts[:, k], index, num_groups)
        adv_k = centred / (std + eps) if scale_std else centred
        total = total + w[k] * zero_where(constant | (size < 2), adv_k)
    return whiten(total, torch.ones_like(rewards) if lengths is None else lengths, 1e-8)


def remax(rewards, index, num_groups, *, baseline_rewards=None):
    """ReMax: A_i = r_i − b_i, b_i the reward of the greedy (argmax) completion of the same prompt.

    Li et al., "ReMax: A Simple, Effective, and Efficient Reinforcement Learning Method for Aligning Large Language
    Models" (arXiv 2310.10505); verl's ``compute_remax_outcome_advantage`` (its trainer samples the greedy rollout
    when ``algorithm.adv_estimator=remax``). ``baseline_rewards`` ``[N]``: the baseline reward of each row's prompt,
    repeated for its rows. pgzoo's Lightning trainer does not generate greedy rollouts, so it cannot run this
    estimator: it is for callers that have the baseline rewards (verl does).
    """
    if baseline_rewards is None:
        raise ConfigError("advantage estimator 'remax' needs baseline_rewards=[N]: the reward of a greedy rollout of "
                          "each row's prompt. pgzoo's trainer does not sample one; verl does "
                          "(algorithm.adv_estimator=remax)")
    b = torch.as_tensor(baseline_rewards, device=rewards.device).to(rewards.dtype)
    if b.shape != rewards.shape:
        raise ConfigError(f"advantage estimator 'remax': baseline_rewards must be [N]={tuple(rewards.shape)} (one per "
                          f"row, the greedy reward of its prompt), got shape {tuple(b.shape)}")
    if not bool(torch.isfinite(b).all()):
        raise ConfigError("advantage estimator 'remax': baseline_rewards contain NaN or Inf")
    return rewards - b


remax.uses_groups = False
remax.inputs = ("baseline_rewards",)
register("remax")(remax)


def reward(rewards, index, num_groups):
    """A_i = r_i: the reward itself, no baseline and no scaling.

    ROLL's advantage with ``norm_mean_type`` and ``norm_std_type`` unset (its RAFT++ recipe: with 0/1 rewards only the
    correct samples carry an advantage, so a policy-gradient loss becomes rejection-sampling fine-tuning); the
    baseline-free REINFORCE of TOPR (arXiv 2503.14286). Needs no groups; a constant group keeps its rewards.
    """
    return rewards.clone()


reward.uses_groups = False
register("reward")(reward)


@register("group-mean-batch-std")
def group_mean_batch_std(rewards, index, num_groups, *, eps: float = 1e-4):
    """A_i = (r_i − mean_g) / (std_B + eps): the group's baseline, the batch's scale.

    TRL's ``scale_rewards="batch"`` (``GRPOConfig``; eps 1e-4, as TRL adds it) and ROLL's ``norm_mean_type: group``
    with ``norm_std_type: batch``; "Lite PPO" (Liu et al., "Part I: Tricks or Traps? A Deep Dive into RL for LLM
    Reasoning", arXiv 2508.08221) recommends it: dividing by the group's std over-weights the groups whose rewards
    barely differ, the batch's std does not. std_B is the unbiased std of every reward of the batch passed in, so the
    batch must be the whole step's: pgzoo's Lightning trainer computes advantages over the whole step (every rank's
    rewards gathered), so it is exact under data parallelism. A constant group, and a group of one, get 0.
    """
    check_eps(eps)
    _, centred, _, constant = group_stats(rewards, index, num_groups)
    n = rewards.numel()
    std = rewards.std() if n > 1 else torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    return zero_where(constant, centred / (std + eps))


@register("maxrl")
def maxrl(rewards, index, num_groups, *, eps: float = 1e-6):
    """MaxRL: A_i = (r_i − mean_g) / (mean_g + eps), the group baseline scaled by the group's pass rate.

    Tajwar et al., "Maximum Likelihood Reinforcement Learning" (arXiv 2602.02710): with 0/1 rewards, dividing by the
    pass rate p̂_g = K/N (K successes of N) makes the policy gradient an unbiased estimate of the gradient of a
    truncated log-likelihood of success, Σ_k≤N log-pass@k style, instead of pass@1: hard prompts (small p̂) weigh
    more. The policy loss is unchanged (the paper uses GRPO's); this is the estimator, as the paper's code and
    SkyRL's ``compute_maxrl_advantage`` compute it. Rewards must be ≥ 0 (the normaliser is a mean reward). A
    constant group (all fail, all succeed) and a group of one get 0 (SkyRL keeps a lone completion's reward).
    """
    check_eps(eps)
    if bool((rewards < 0).any()):
        raise ConfigError("advantage estimator 'maxrl' divides by the group's mean reward (its pass rate): rewards "
                          "must be >= 0 (0/1 success rewards in the paper); shift or clip the reward, or use "
                          "group-mean-std")
    size, centred, _, constant = group_stats(rewards, index, num_groups)
    mean = group_sum(rewards, index, num_groups)[index] / size
    return zero_where(constant | (size < 2), centred / (mean + eps))


def a_star(rewards, index, num_groups, *, beta1: float = 0.5, reference_rewards=None):
    """A*-PO's optimal advantage A_i = r_i − V*(x_i), V*(x) = β1·log(mean_j exp(r_j/β1)) (a soft maximum).

    "Accelerating RL for LLM Reasoning with Optimal Advantage Regression" (arXiv 2505.20686), stage 1; the default
    β1 = 0.5 is TRL's ``A2POConfig.beta1``. The paper and TRL's ``A2POTrainer`` estimate V*(x) from n samples of
    the *reference* policy per prompt, drawn once before training. Without ``reference_rewards``, pgzoo estimates it
    from the group's own G rewards (the samples of the current policy), so V* moves with the policy; β1 → 0 gives the
    group's best reward, β1 → ∞ its mean (``group-mean``). A group whose rewards are all equal (a group of one
    included) has V* = r and gets exactly 0.

    ``reference_rewards`` ``[N, n]``: row i the rewards of n reference-policy samples of row i's prompt (repeated for
    the rows of one prompt, as ``remax``'s ``baseline_rewards``); V* is then taken over them, as TRL does, and groups
    play no part. Not a trainer input: pgzoo's trainer samples no reference completions.
    """
    beta1 = check_number("advantages: beta1", beta1, low=0.0, low_open=True,
                         hint="TRL's A2POConfig.beta1 is 0.5; small β1 makes V* the best reward, large β1 the mean")
    if reference_rewards is not None:
        ref = torch.as_tensor(reference_rewards, device=rewards.device).to(rewards.dtype)
        if ref.dim() != 2 or ref.shape[0] != rewards.shape[0] or ref.shape[1] == 0:
            raise ConfigError(f"advantage estimator 'a-star': reference_rewards must be [N={rewards.shape[0]}, n] "
                              f"(row i: the rewards of n reference samples of row i's prompt), got shape "
                              f"{tuple(ref.shape)}")
        if not bool(torch.isfinite(ref).all()):
            raise ConfigError("advantage estimator 'a-star': reference_rewards contain NaN or Inf")
        v_star = beta1 * (torch.logsumexp(ref / beta1, dim=1) - math.log(ref.shape[1]))
        return rewards - v_star
    _, _, _, constant = group_stats(rewards, index, num_groups)
    scaled = rewards / beta1
    top = torch.zeros(num_groups, dtype=rewards.dtype, device=rewards.device).scatter_reduce(
        0, index, scaled, "amax", include_self=False)
    log_mean_exp = top + torch.log(group_sum(torch.exp(scaled - top[index]), index, num_groups)) - torch.log(
        group_sum(torch.ones_like(rewards), index, num_groups))
    return zero_where(constant, rewards - beta1 * log_mean_exp[index])


register("a-star")(a_star)
