"""Per-token advantage estimators: reinforce++ with gamma < 1 and optimal-token-baseline, each against a naive loop
over Python floats and against verl 0.9.1's own function on the same tensors (ragged lengths, a mask with a hole
inside a row, garbage at masked positions); compute's per-token input checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import pgzoo
from pgzoo.advantages import compute

N, T, G = 8, 7, 4


def make_batch(seed: int, hole: bool = True):
    """Outcome rewards, a ragged right-padded response mask (one row with a masked position inside it, as a
    multi-turn rollout's tool output), per-token log-probs and Σπ² with garbage at masked positions."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (N,), generator=g)
    lengths[0] = T  # a full row
    mask = (torch.arange(T)[None] < lengths[:, None]).to(torch.float32)
    if hole:
        mask[0, 2] = 0.0
    rewards = torch.randn(N, generator=g)
    old_logprobs = -2.0 * torch.rand(N, T, generator=g)
    sum_pi_squared = 0.1 + 0.8 * torch.rand(N, T, generator=g)
    is_weights = 0.5 + torch.rand(N, T, generator=g)
    for x in (old_logprobs, sum_pi_squared, is_weights):
        x[mask == 0] = 7.0  # garbage the estimators must never read (finite under exp: verl multiplies by the mask)
    return rewards, mask, old_logprobs, sum_pi_squared, is_weights


def token_level_rewards(rewards, mask):
    """verl's layout: the outcome reward on the row's last response token."""
    last = (mask * torch.arange(mask.shape[1])).argmax(-1)
    out = torch.zeros_like(mask)
    out[torch.arange(mask.shape[0]), last] = rewards.to(mask.dtype)
    return out


# ---------------------------------------------------------------------------------------------- naive references
def naive_reinforce_pp(rewards, mask, gamma, eps=1e-8):
    returns = {}
    for i in range(mask.shape[0]):
        valid = [t for t in range(mask.shape[1]) if mask[i, t] == 1]
        for j, t in enumerate(valid):
            returns[i, t] = gamma ** (len(valid) - 1 - j) * float(rewards[i])
    values = list(returns.values())
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    out = torch.zeros(mask.shape, dtype=torch.float64)
    for (i, t), v in returns.items():
        out[i, t] = (v - mean) / math.sqrt(var + eps)
    return out


def naive_otb(rewards, mask, old_logprobs, sum_pi_squared, groups, is_weights=None, zero_tail=True, eps=1e-8):
    n, width = mask.shape
    energy = [[0.0] * width for _ in range(n)]
    for i in range(n):
        acc = 0.0
        for t in range(width):
            if mask[i, t] == 1:
                w = 1 - 2 * math.exp(float(old_logprobs[i, t])) + float(sum_pi_squared[i, t])
                acc += w * (1.0 if is_weights is None else float(is_weights[i, t]) ** 2)
            energy[i][t] = acc
    out = torch.zeros(mask.shape, dtype=torch.float64)
    for i in range(n):
        mates = [j for j in range(n) if groups[j] == groups[i]]
        count = [int(mask[j].sum()) for j in mates]
        lone_longest = count.count(max(count)) == 1 and int(mask[i].sum()) == max(count) and len(mates) > 1
        runner_up = sorted(count)[-2] if len(mates) > 1 else 0
        for t in range(width):
            if mask[i, t] != 1:
                continue
            num = sum(float(rewards[j]) * energy[j][t] for j in mates if mask[j, t] == 1)
            den = sum(energy[j][t] for j in mates if mask[j, t] == 1) + eps
            baseline = num / den if len(mates) > 1 else 0.0
            if zero_tail and lone_longest and t >= runner_up:
                baseline = 0.0
            out[i, t] = float(rewards[i]) - baseline
    return out


@pytest.mark.parametrize("gamma", [0.0, 0.9])
def test_reinforce_pp_with_gamma_matches_the_naive_loop(gamma):
    rewards, mask, *_ = make_batch(0)
    got = compute("reinforce++", rewards.double(), response_mask=mask, gamma=gamma)
    torch.testing.assert_close(got, naive_reinforce_pp(rewards.double(), mask, gamma), rtol=1e-10, atol=1e-10)


def test_reinforce_pp_gamma_one_is_todays_estimator_bit_for_bit():
    """gamma=1 (the default) gives one advantage per completion, the response mask only lending its row sums."""
    rewards, mask, *_ = make_batch(1, hole=False)
    before = compute("reinforce++", rewards, lengths=mask.sum(-1))
    assert torch.equal(compute("reinforce++", rewards, lengths=mask.sum(-1), gamma=1.0), before)
    assert torch.equal(compute("reinforce++", rewards, response_mask=mask), before)


@pytest.mark.parametrize("zero_tail", [True, False])
def test_otb_matches_the_naive_loop(zero_tail):
    rewards, mask, olp, spp, isw = make_batch(2)
    groups = [0, 0, 0, 1, 1, 1, 1, 2]  # ragged, with a group of one
    got = compute("optimal-token-baseline", rewards.double(), group_ids=torch.tensor(groups), response_mask=mask,
                  old_logprobs=olp, sum_pi_squared=spp, rollout_is_weights=isw, handle_zero_tail=zero_tail)
    expected = naive_otb(rewards.double(), mask, olp, spp, groups, isw, zero_tail)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    lone = torch.tensor(groups) == 2
    torch.testing.assert_close(got[lone], (rewards.double()[:, None] * mask)[lone])  # no baseline: the return


def test_nan_at_masked_positions_never_reaches_the_estimator():
    rewards, mask, olp, spp, _ = make_batch(3)
    clean = compute("optimal-token-baseline", rewards, group_size=G, response_mask=mask, old_logprobs=olp,
                    sum_pi_squared=spp)
    olp[mask == 0], spp[mask == 0] = float("nan"), float("inf")
    assert torch.equal(compute("optimal-token-baseline", rewards, group_size=G, response_mask=mask,
                               old_logprobs=olp, sum_pi_squared=spp), clean)


def test_per_token_inputs_are_checked():
    rewards, mask, olp, spp, _ = make_batch(4)
    otb = dict(group_size=G, response_mask=mask, old_logprobs=olp, sum_pi_squared=spp)
    with pytest.raises(pgzoo.ConfigError, match="gamma=0.9 < 1 gives per-token .* pass response_mask"):
        compute("reinforce++", rewards, gamma=0.9)
    with pytest.raises(pgzoo.ConfigError, match="gamma=1.5 must be"):
        compute("reinforce++", rewards, response_mask=mask, gamma=1.5)
    with pytest.raises(pgzoo.ConfigError, match="needs the per-token .* sum_pi_squared"):
        compute("optimal-token-baseline", rewards, group_size=G, response_mask=mask, old_logprobs=olp)
    with pytest.raises(pgzoo.ConfigError, match=r"old_logprobs is per token \[N, T\]; pass response_mask"):
        compute("optimal-token-baseline", rewards, group_size=G, old_logprobs=olp, sum_pi_squared=spp)
    with pytest.raises(pgzoo.ConfigError, match=r"sum_pi_squared must be per token, shaped like response_mask"):
        compute("optimal-token-baseline", **{**otb, "sum_pi_squared": spp[:, :-1]}, rewards=rewards)
    with pytest.raises(pgzoo.ConfigError, match="old_logprobs holds NaN or Inf at a response token"):
        compute("optimal-token-baseline", **{**otb, "old_logprobs": torch.full_like(olp, float("nan"))},
                rewards=rewards)
    with pytest.raises(pgzoo.ConfigError, match=r"response_mask must be a \[N=8, T\] tensor"):
        compute("reinforce++", rewards, response_mask=mask[:4], gamma=0.5)
    with pytest.raises(pgzoo.ConfigError, match="only 0 and 1"):
        compute("reinforce++", rewards, response_mask=2 * mask, gamma=0.5)
    with pytest.raises(pgzoo.ConfigError, match="a row without tokens"):
        compute("reinforce++", rewards, response_mask=torch.zeros_like(mask), gamma=0.5)
    with pytest.raises(pgzoo.ConfigError, match="lengths disagree with response_mask"):
        compute("reinforce++", rewards, response_mask=mask, lengths=mask.sum(-1) + 1)
    with pytest.raises(pgzoo.ConfigError, match="has no option"):
        compute("group-mean", rewards, group_size=G, response_mask=mask, old_logprobs=olp)


def test_an_estimator_returning_a_wrong_shape_is_named():
    pgzoo.advantages.register("test-wrong-shape")(lambda rewards, index, num_groups: rewards[:-1])
    try:
        with pytest.raises(pgzoo.ConfigError, match=r"'test-wrong-shape' returned shape \(7,\), expected \[N\]=8"):
            compute("test-wrong-shape", torch.zeros(N), group_size=G)
    finally:
        pgzoo.advantages.unregister("test-wrong-shape")


def test_declarations():
    assert pgzoo.advantages.token_inputs("reinforce++") == ("response_mask",)
    assert pgzoo.advantages.token_inputs("group-mean") == ()
    assert "optimal-token-baseline" in pgzoo.advantages.available()
    assert "optimal-token-baseline" not in pgzoo.advantages.trainer_estimators()  # needs π_θold and Σπ² first
    assert "reinforce++" in pgzoo.advantages.trainer_estimators()


# ---------------------------------------------------------------------------------------------- verl's functions
core_algos = pytest.importorskip("verl.trainer.ppo.core_algos",
                                 reason="verl 0.9.1 is not installed (`make install` installs it)")


@pytest.mark.parametrize("seed, gamma", [(0, 0.9), (1, 0.5), (2, 0.0)])
def test_reinforce_pp_with_gamma_equals_verl(seed, gamma):
    from omegaconf import OmegaConf

    rewards, mask, *_ = make_batch(seed)
    adv, _ = core_algos.compute_reinforce_plus_plus_outcome_advantage(
        token_level_rewards(rewards, mask), mask, config=OmegaConf.create({"gamma": gamma}))
    ours = compute("reinforce++", rewards, response_mask=mask, gamma=gamma)
    torch.testing.assert_close(ours, adv, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed, zero_tail, with_is", [(0, True, False), (1, False, False), (2, True, True)])
def test_otb_equals_verl(seed, zero_tail, with_is):
    rewards, mask, olp, spp, isw = make_batch(seed)
    uid = np.array(["a", "b", "a", "b", "c", "c", "a", "d"], dtype=object)  # interleaved, ragged, one alone
    adv, _ = core_algos.compute_optimal_token_baseline_advantage(
        token_level_rewards(rewards, mask), mask, uid, olp, spp, rollout_is_weights=isw if with_is else None,
        handle_zero_tail=zero_tail)
    ids = torch.tensor([ord(u) for u in uid])
    ours = compute("optimal-token-baseline", rewards, group_ids=ids, response_mask=mask, old_logprobs=olp,
                   sum_pi_squared=spp, rollout_is_weights=isw if with_is else None, handle_zero_tail=zero_tail)
    torch.testing.assert_close(ours, adv, rtol=1e-6, atol=1e-6)
    assert bool(adv.abs().sum() > 0)


def test_verl_adapter_passes_per_token_inputs_under_verls_names():
    """The plugin's estimator wrapper on a per-token estimator: verl's keywords in, pgzoo's [N, T] out."""
    from omegaconf import OmegaConf

    from pgzoo.adapters.verl.estimators import make_estimator

    rewards, mask, olp, spp, isw = make_batch(5)
    uid = np.array([f"p{i // G}" for i in range(N)], dtype=object)
    tlr = token_level_rewards(rewards, mask)
    adv, _ = make_estimator("optimal-token-baseline")(tlr, mask, OmegaConf.create({}), index=uid,
                                                            old_log_probs=olp, sum_pi_squared=spp,
                                                            rollout_is_weights=isw, reward_baselines=None)
    expected, _ = core_algos.compute_optimal_token_baseline_advantage(tlr, mask, uid, olp, spp,
                                                                      rollout_is_weights=isw)
    torch.testing.assert_close(adv, expected, rtol=1e-6, atol=1e-6)
    adv, _ = make_estimator("reinforce++")(tlr, mask, OmegaConf.create({"pgzoo": {"gamma": 0.9}}), index=uid)
    expected, _ = core_algos.compute_reinforce_plus_plus_outcome_advantage(tlr, mask,
                                                                          config=OmegaConf.create({"gamma": 0.9}))
    torch.testing.assert_close(adv, expected, rtol=1e-5, atol=1e-6)
