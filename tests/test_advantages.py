"""Advantage estimators against naive per-group loops, constant groups, group ids and errors."""

from __future__ import annotations

import statistics

import pytest
import torch

import pgzoo
from pgzoo.advantages import compute


def naive(name, rewards, groups, eps=1e-6):
    out = []
    for i, r in enumerate(rewards):
        mates = [rewards[j] for j in range(len(rewards)) if groups[j] == groups[i]]
        mean = sum(mates) / len(mates)
        if len(set(mates)) == 1:
            out.append(0.0)
        elif name == "group-mean":
            out.append(r - mean)
        elif name == "group-mean-std":
            out.append((r - mean) / (statistics.stdev(mates) + eps))
        else:
            others = [rewards[j] for j in range(len(rewards)) if groups[j] == groups[i] and j != i]
            out.append(r - sum(others) / len(others))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("name", ["group-mean", "group-mean-std", "leave-one-out"])
def test_matches_naive_with_group_size(name):
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(24, generator=g, dtype=torch.float64)
    rewards[8:12] = 0.7  # one constant group
    got = compute(name, rewards, group_size=4)
    expected = naive(name, rewards.tolist(), [i // 4 for i in range(24)])
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert (got[8:12] == 0).all()


@pytest.mark.parametrize("name", ["group-mean", "group-mean-std", "leave-one-out"])
def test_group_ids_ragged_and_interleaved(name):
    rewards = torch.tensor([1.0, 0.0, 3.0, 1.0, 1.0, 2.0, 5.0], dtype=torch.float64)
    ids = torch.tensor([7, 3, 7, 3, 3, 9, 9])
    got = compute(name, rewards, group_ids=ids)
    torch.testing.assert_close(got, naive(name, rewards.tolist(), ids.tolist()), rtol=1e-12, atol=1e-12)


def test_group_ids_equal_group_size_under_permutation():
    rewards = torch.rand(12, dtype=torch.float64)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    by_size = compute("group-mean-std", rewards, group_size=3)
    by_ids = compute("group-mean-std", rewards[perm], group_ids=(torch.arange(12) // 3)[perm])
    torch.testing.assert_close(by_ids, by_size[perm])


def test_known_values():
    adv = compute("group-mean-std", torch.tensor([1.0, 0.0, 0.0, 0.0]), group_size=2)
    torch.testing.assert_close(adv, torch.tensor([0.70710677, -0.70710677, 0.0, 0.0]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compute("group-mean", torch.tensor([1.0, 0.0, 0.0, 0.0]), group_size=4),
                               torch.tensor([0.75, -0.25, -0.25, -0.25]))
    torch.testing.assert_close(compute("leave-one-out", torch.tensor([1.0, 0.0, 0.0, 0.0]), group_size=4),
                               torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3]))


@pytest.mark.parametrize("name", ["group-mean", "group-mean-std", "leave-one-out"])
def test_constant_groups_and_singletons_give_zero_not_nan(name):
    rewards = torch.tensor([0.1, 0.1, 0.1, 1e-30, 1e-30, 1e-30])  # 0.1 has no exact float mean of three
    assert (compute(name, rewards, group_size=3) == 0).all()
    assert (compute(name, torch.tensor([0.3, 2.0]), group_size=1) == 0).all()


def test_integer_rewards_are_accepted():
    adv = compute("group-mean", torch.tensor([1, 0, 1, 1]), group_size=2)
    assert adv.dtype.is_floating_point and adv.tolist() == [0.5, -0.5, 0.0, 0.0]


def test_errors():
    with pytest.raises(pgzoo.UnknownNameError, match="Did you mean 'group-mean-std'"):
        compute("group-mean-sd", torch.zeros(4), group_size=2)
    with pytest.raises(pgzoo.ConfigError, match="does not divide"):
        compute("group-mean", torch.zeros(5), group_size=2)
    with pytest.raises(pgzoo.ConfigError, match="exactly one"):
        compute("group-mean", torch.zeros(4))
    with pytest.raises(pgzoo.ConfigError, match="exactly one"):
        compute("group-mean", torch.zeros(4), group_size=2, group_ids=torch.zeros(4, dtype=torch.long))
    with pytest.raises(pgzoo.ConfigError, match="group_ids"):
        compute("group-mean", torch.zeros(4), group_ids=torch.zeros(3, dtype=torch.long))
    with pytest.raises(pgzoo.ConfigError, match="integer"):
        compute("group-mean", torch.zeros(4), group_ids=torch.zeros(4))
    with pytest.raises(pgzoo.ConfigError, match="NaN"):
        compute("group-mean", torch.tensor([0.0, float("nan")]), group_size=2)
    with pytest.raises(pgzoo.ConfigError, match="non-empty"):
        compute("group-mean", torch.zeros(2, 2), group_size=2)


def test_custom_estimator_registration():
    @pgzoo.advantages.register("test-raw")
    def raw(rewards, index, num_groups, **_):
        return rewards.clone()

    try:
        assert "test-raw" in pgzoo.advantages.available()
        assert compute("test_raw", torch.tensor([1.0, 2.0]), group_size=2).tolist() == [1.0, 2.0]
        with pytest.raises(pgzoo.ConfigError, match="already registered"):
            pgzoo.advantages.register("test-raw")(raw)
    finally:
        pgzoo.advantages._ESTIMATORS.pop("test-raw")
