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
        pgzoo.advantages.unregister("test-raw")


# -- the estimators of verl and their papers, each against a naive per-row loop --------------------------------------
# The references follow verl 0.9.1's verl/trainer/ppo/core_algos.py (compute_*_outcome_advantage) on outcome rewards
# (one reward per completion, γ = 1), written here as plain loops over Python floats; groups have >= 2 members
# (verl gives a group of one a zero baseline, pgzoo a zero advantage).
def _groups(ids):
    out = {}
    for i, g in enumerate(ids):
        out.setdefault(g, []).append(i)
    return out


def _whiten_ref(values, weights, eps=1e-8):
    """verl's masked_whiten over the token grid: each completion's value repeated over its length (mask = 1)."""
    flat = [v for v, w in zip(values, weights) for _ in range(int(w))]
    n = len(flat)
    mean = sum(flat) / n
    var = sum((x - mean) ** 2 for x in flat) / n * n / (n - 1)
    return [(v - mean) / (var + eps) ** 0.5 for v in values]


def ref_reinforce_pp(r, ids, lengths):
    return _whiten_ref(r, lengths)


def ref_reinforce_pp_baseline(r, ids, lengths):
    centred = list(r)
    for rows in _groups(ids).values():
        mean = sum(r[i] for i in rows) / len(rows)
        for i in rows:
            centred[i] = r[i] - mean
    return _whiten_ref(centred, lengths)


def ref_opo(r, ids, lengths):
    out = list(r)
    for rows in _groups(ids).values():
        b = sum(lengths[i] * r[i] for i in rows) / sum(lengths[i] for i in rows)
        for i in rows:
            out[i] = r[i] - b
    return out


def ref_gpg(r, ids, lengths, f_norm=1.0):
    alpha = len(r) / max(1, sum(1 for x in r if x != 0))
    out = list(r)
    for rows in _groups(ids).values():
        mean = sum(r[i] for i in rows) / len(rows)
        for i in rows:
            out[i] = alpha * (r[i] - mean) / f_norm
    return out


def ref_grpo_passk(r, ids, lengths, eps=1e-6):
    out = [0.0] * len(r)
    for rows in _groups(ids).values():
        ranked = sorted(rows, key=lambda i: -r[i])
        best, second = ranked[0], ranked[1]
        out[best] = (r[best] - r[second]) / (statistics.stdev([r[i] for i in rows]) + eps)
    return out


REFS = {"reinforce++": ref_reinforce_pp, "reinforce++-baseline": ref_reinforce_pp_baseline, "opo": ref_opo,
        "gpg": ref_gpg, "grpo-passk": ref_grpo_passk}


@pytest.mark.parametrize("name", sorted(REFS))
@pytest.mark.parametrize("binary", [False, True])
def test_verl_estimators_match_naive_loops(name, binary):
    g = torch.Generator().manual_seed(3)
    ids = torch.tensor([4, 1, 4, 1, 1, 7, 7, 7, 4, 9, 9, 9])  # ragged, interleaved groups of 2..4
    r = (torch.rand(12, generator=g, dtype=torch.float64) < 0.5).double() if binary else \
        torch.randn(12, generator=g, dtype=torch.float64)
    r[[9, 10, 11]] = r[9] + torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)  # a tie at the top of group 9
    lengths = torch.randint(1, 20, (12,), generator=g)
    got = compute(name, r, group_ids=ids, lengths=lengths)
    expected = torch.tensor(REFS[name](r.tolist(), ids.tolist(), lengths.tolist()), dtype=torch.float64)
    if name not in ("reinforce++", "reinforce++-baseline"):  # pgzoo: a constant group is exactly 0
        for rows in _groups(ids.tolist()).values():
            if len({r[i].item() for i in rows}) == 1:
                expected[rows] = 0.0
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_rloo_is_leave_one_out_under_the_name_users_know():
    r = torch.tensor([1.0, 0.0, 0.0, 2.0, 5.0, 1.0])
    torch.testing.assert_close(compute("rloo", r, group_size=3), compute("leave-one-out", r, group_size=3))
    assert {"rloo", "leave-one-out"} <= set(pgzoo.advantages.available())
    assert pgzoo.advantages.available("reinforce*") == ["reinforce++", "reinforce++-baseline"]


def test_reinforce_pp_needs_no_groups_and_weights_by_length_only_when_given():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    plain = compute("reinforce++", r)
    mean, std = r.mean(), r.std()  # completion-weighted, unbiased
    torch.testing.assert_close(plain, (r - mean) / torch.sqrt(std**2 + 1e-8))
    weighted = compute("reinforce++", r, lengths=torch.tensor([1, 1, 1, 1, 10]))
    assert not torch.allclose(plain, weighted)
    assert (compute("reinforce++", torch.ones(4)) == 0).all()  # a constant batch: no signal, not noise
    with pytest.raises(pgzoo.ConfigError, match="exactly one"):
        compute("reinforce++-baseline", r)  # the baseline is the group's: groups are needed


def test_opo_needs_lengths_and_validates_them():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0])
    with pytest.raises(pgzoo.ConfigError, match="lengths"):
        compute("opo", r, group_size=2)
    for bad in (torch.tensor([1, 2, 3]), torch.tensor([1, 0, 2, 2]), torch.tensor([1.0, float("nan"), 1.0, 1.0]),
                torch.tensor([True, True, True, True]), torch.tensor([[1, 2, 3, 4]])):
        with pytest.raises(pgzoo.ConfigError, match="lengths"):
            compute("opo", r, group_size=2, lengths=bad)
    # equal lengths: OPO's baseline is the group mean
    torch.testing.assert_close(compute("opo", r, group_size=2, lengths=torch.full((4,), 7)),
                               compute("group-mean", r, group_size=2))
    # lengths are ignored by estimators that do not use them
    torch.testing.assert_close(compute("group-mean", r, group_size=2, lengths=torch.tensor([1, 5, 2, 9])),
                               compute("group-mean", r, group_size=2))


def test_gpg_rescales_by_the_share_of_nonzero_rewards():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])  # 1 of 8 nonzero: alpha = 8
    torch.testing.assert_close(compute("gpg", r, group_size=4), 8 * compute("group-mean", r, group_size=4))
    torch.testing.assert_close(compute("gpg", r, group_size=4, f_norm=2.0), 4 * compute("group-mean", r, group_size=4))


def test_grpo_passk_credits_only_the_best():
    r = torch.tensor([0.0, 1.0, 0.0, 0.5, 2.0, 2.0])
    adv = compute("grpo-passk", r, group_size=3, scale_std=False)
    assert adv.tolist() == [0.0, 1.0, 0.0, 0.0, 0.0, 0.0]  # group 2: a tie at the top gives 0


def _comb(n, k):
    from math import comb

    return comb(n, k) if 0 <= k <= n else 0


def ref_pass_at_k(r, ids, k):
    out = [0.0] * len(r)
    for rows in _groups(ids).values():
        n, neg = len(rows), sum(1 for i in rows if r[i] == 0)
        mean = 1 - _comb(neg, k) / _comb(n, k)
        sigma = (mean * (1 - mean)) ** 0.5
        for i in rows:
            if sigma == 0:
                continue
            out[i] = (1 - mean) / sigma if r[i] == 1 else \
                (1 - mean - _comb(neg - 1, k - 1) / _comb(n - 1, k - 1)) / sigma
    return out


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_pass_at_k_matches_its_closed_form(k):
    g = torch.Generator().manual_seed(k)
    r = (torch.rand(40, generator=g) < 0.4).double()
    r[:8] = 0.0  # a group with no success
    got = compute("pass-at-k", r, group_size=8, k=k)
    torch.testing.assert_close(got, torch.tensor(ref_pass_at_k(r.tolist(), [i // 8 for i in range(40)], k),
                                                 dtype=torch.float64), rtol=1e-10, atol=1e-10)
    assert (got[:8] == 0).all()


def test_pass_at_1_is_grpo_with_the_population_std():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    mean = r.view(2, 4).mean(-1, keepdim=True)
    expected = ((r.view(2, 4) - mean) / r.view(2, 4).std(-1, unbiased=False, keepdim=True)).flatten()
    torch.testing.assert_close(compute("pass-at-k", r, group_size=4, k=1), expected)


def test_pass_at_k_rejects_graded_rewards_and_big_k():
    with pytest.raises(pgzoo.ConfigError, match="binary"):
        compute("pass-at-k", torch.tensor([0.5, 1.0]), group_size=2)
    with pytest.raises(pgzoo.ConfigError, match="smallest group"):
        compute("pass-at-k", torch.tensor([0.0, 1.0]), group_size=2, k=3)


@pytest.mark.parametrize("name,options,match", [
    ("group-mean-std", {"eps": "1e-6"}, "eps"), ("group-mean-std", {"eps": 0.0}, "eps"),
    ("group-mean", {"eps": 1e-6}, "no option"), ("pass-at-k", {"k": 2.0}, "integer"),
    ("pass-at-k", {"k": True}, "integer"), ("gpg", {"f_norm": -1.0}, "f_norm"),
    ("grpo-passk", {"scale_std": "false"}, "scale_std")])
def test_options_are_strict(name, options, match):
    with pytest.raises(pgzoo.ConfigError, match=match):
        compute(name, torch.tensor([1.0, 0.0, 0.0, 1.0]), group_size=2, **options)
