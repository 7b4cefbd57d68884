"""pgzoo's gdpo and remax estimators: a naive reference each, and verl 0.9.1's own functions on the same tensors;
pgzoo's pass-at-k through the plugin's verl estimator (skipped where verl is not importable)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pgzoo


def make_rewards(seed, N=12, G=4, K=2):
    g = torch.Generator().manual_seed(seed)
    components = torch.randint(0, 3, (N, K), generator=g).to(torch.float64) + 0.1 * torch.rand(N, K, generator=g,
                                                                                               dtype=torch.float64)
    lengths = torch.randint(1, 9, (N,), generator=g)
    return components, lengths, G


# ---------------------------------------------------------------------------------------------- naive references
def naive_gdpo(components, G, weights, lengths, eps=1e-6):
    N, K = components.shape
    total = [0.0] * N
    for k in range(K):
        for start in range(0, N, G):
            group = [float(components[i, k]) for i in range(start, start + G)]
            mean = sum(group) / G
            std = (sum((x - mean) ** 2 for x in group) / (G - 1)) ** 0.5
            for j, x in enumerate(group):
                total[start + j] += weights[k] * (0.0 if std == 0 else (x - mean) / (std + eps))
    n = sum(float(l) for l in lengths)
    mean = sum(t * float(l) for t, l in zip(total, lengths)) / n
    var = sum(float(l) * (t - mean) ** 2 for t, l in zip(total, lengths)) / n * n / (n - 1)
    return torch.tensor([(t - mean) / (var + 1e-8) ** 0.5 for t in total], dtype=torch.float64)


@pytest.mark.parametrize("seed", range(3))
def test_gdpo_naive(seed):
    components, lengths, G = make_rewards(seed)
    weights = [1.0, 0.5]
    got = pgzoo.advantages.compute("gdpo", components.sum(-1), group_size=G, components=components, weights=weights,
                                   lengths=lengths)
    torch.testing.assert_close(got, naive_gdpo(components, G, weights, lengths), rtol=1e-9, atol=1e-9)


def test_gdpo_refuses_misshaped_components():
    with pytest.raises(pgzoo.ConfigError, match="components must be"):
        pgzoo.advantages.compute("gdpo", torch.ones(4), group_size=2, components=torch.ones(3, 2))


def test_remax_naive_and_refusal():
    r = torch.tensor([1.0, 0.0, 0.5, 1.0])
    b = torch.tensor([0.5, 0.5, 1.0, 1.0])
    torch.testing.assert_close(pgzoo.advantages.compute("remax", r, baseline_rewards=b), r - b)
    with pytest.raises(pgzoo.ConfigError, match="baseline_rewards"):
        pgzoo.advantages.compute("remax", r)


# ---------------------------------------------------------------------------------------------- verl's functions
core_algos = pytest.importorskip("verl.trainer.ppo.core_algos",
                                 reason="verl 0.9.1 is not installed (`make install` installs it)")


def token_rewards(scores, lengths, T=9):
    """verl's layout: the outcome reward on the last response token."""
    N = scores.shape[0]
    mask = (torch.arange(T)[None] < lengths[:, None]).to(torch.float32)
    rewards = torch.zeros(N, T, dtype=torch.float32)
    rewards[torch.arange(N), lengths - 1] = scores.float()
    return rewards, mask


@pytest.mark.parametrize("seed", range(3))
def test_gdpo_equals_verl(seed):
    components, lengths, G = make_rewards(seed)
    N = components.shape[0]
    uid = np.array([f"p{i // G}" for i in range(N)], dtype=object)
    rewards, mask = token_rewards(components.sum(-1), lengths)
    # verl reads the components from non_tensor_batch under algorithm.gdpo_reward_keys, placed at the last token
    from omegaconf import OmegaConf

    config = OmegaConf.create({"gdpo_reward_keys": ["a", "b"], "gdpo_reward_weights": [1.0, 0.5]})
    batch = {"prompts": torch.ones(N, 2, dtype=torch.long),
             "attention_mask": torch.cat([torch.ones(N, 2), mask], dim=1).long()}
    non_tensor = {"a": components[:, 0].numpy(), "b": components[:, 1].numpy()}
    adv, _ = core_algos.compute_gdpo_outcome_advantage(rewards, mask, uid, config=config, non_tensor_batch=non_tensor,
                                                       batch=batch)
    ours = pgzoo.advantages.compute("gdpo", components.sum(-1), group_size=G, components=components,
                                    weights=[1.0, 0.5], lengths=lengths)
    torch.testing.assert_close(adv, (ours[:, None] * mask).float(), rtol=1e-5, atol=1e-5)


def test_remax_equals_verl():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(6, generator=g)
    baselines = torch.rand(6, generator=g)
    lengths = torch.tensor([3, 9, 1, 5, 7, 2])
    rewards, mask = token_rewards(scores, lengths)
    adv, _ = core_algos.compute_remax_outcome_advantage(rewards, baselines.float(), mask)
    ours = pgzoo.advantages.compute("remax", scores, baseline_rewards=baselines)
    torch.testing.assert_close(adv, (ours[:, None] * mask).float(), rtol=1e-6, atol=1e-6)


def test_plugin_estimator_is_pgzoos_pass_at_k():
    from omegaconf import OmegaConf

    from pgzoo.adapters.verl import plugin

    assert "pgzoo/pass-at-k" in plugin.ESTIMATORS
    # estimators verl has under its own name are not registered twice
    assert not any(name in ("pgzoo/gdpo", "pgzoo/remax", "pgzoo/group-mean-std", "pgzoo/reinforce++",
                            "pgzoo/optimal-token-baseline") for name in plugin.ESTIMATORS)
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    lengths = torch.tensor([3, 4, 5, 6, 2, 2, 8, 1])
    rewards, mask = token_rewards(scores, lengths)
    uid = np.array(["a"] * 4 + ["b"] * 4, dtype=object)
    fn = core_algos.get_adv_estimator_fn("pgzoo/pass-at-k")
    adv, returns = fn(token_level_rewards=rewards, response_mask=mask, config=OmegaConf.create({"pgzoo": {"k": 2}}),
                      index=uid)
    ours = pgzoo.advantages.compute("pass-at-k", scores, group_size=4, k=2)
    torch.testing.assert_close(adv, (ours[:, None] * mask).float())
    assert bool(adv.abs().sum() > 0)
