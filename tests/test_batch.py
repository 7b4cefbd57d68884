"""TokenBatch validation: every malformed batch raises a BatchError naming the field and the fix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pgzoo
from pgzoo.objectives.base import aggregate
from pgzoo.testing import random_batch


def _fields(B=3, T=4, **changes):
    lp = -torch.rand(B, T)
    values = dict(logprobs=lp, mask=torch.ones(B, T, dtype=torch.bool), advantages=torch.randn(B),
                  old_logprobs=lp.clone(), rollout_logprobs=lp.clone(), ref_logprobs=lp.clone())
    values.update(changes)
    return values


BAD = {
    "logprobs rank 1": ("logprobs", dict(logprobs=torch.zeros(4)), "rank 2"),
    "logprobs rank 3": ("logprobs", dict(logprobs=torch.zeros(3, 4, 1)), "rank 2"),
    "logprobs int": ("logprobs", dict(logprobs=torch.zeros(3, 4, dtype=torch.long)), "floating"),
    "logprobs not a tensor": ("logprobs", dict(logprobs=[[0.0]]), "torch.Tensor"),
    "empty batch": ("logprobs", dict(logprobs=torch.zeros(0, 4), mask=torch.zeros(0, 4), advantages=torch.zeros(0),
                                     old_logprobs=None, rollout_logprobs=None, ref_logprobs=None), "empty"),
    "empty sequence": ("logprobs", dict(logprobs=torch.zeros(3, 0), mask=torch.zeros(3, 0), old_logprobs=None,
                                        rollout_logprobs=None, ref_logprobs=None), "empty"),
    "mask shape": ("mask", dict(mask=torch.ones(3, 5)), "does not match"),
    "advantages shape": ("advantages", dict(advantages=torch.zeros(4)), "fits neither"),
    "advantages int": ("advantages", dict(advantages=torch.zeros(3, dtype=torch.long)), "floating"),
    "old shape": ("old_logprobs", dict(old_logprobs=torch.zeros(3, 5)), "does not match"),
    "rollout dtype": ("rollout_logprobs", dict(rollout_logprobs=torch.zeros(3, 4, dtype=torch.int32)), "floating"),
    "ref with grad": ("ref_logprobs", dict(ref_logprobs=torch.zeros(3, 4, requires_grad=True)), "gradient"),
    "other device": ("old_logprobs", dict(old_logprobs=torch.zeros(3, 4, device="meta")), "meta"),
    "nan unmasked": ("logprobs", dict(logprobs=torch.tensor([[0.0, float("nan")]] * 3), mask=torch.ones(3, 2),
                                      old_logprobs=None, rollout_logprobs=None, ref_logprobs=None), "non-finite"),
    "inf rollout": ("rollout_logprobs", dict(logprobs=torch.zeros(3, 2), mask=torch.ones(3, 2),
                                             old_logprobs=None, ref_logprobs=None,
                                             rollout_logprobs=torch.tensor([[0.0, -float("inf")]] * 3)), "non-finite"),
    "nan advantage": ("advantages", dict(advantages=torch.tensor([0.0, float("nan"), 1.0])), "non-finite"),
    "no token at all": ("mask", dict(mask=torch.zeros(3, 4, dtype=torch.bool)), "no unmasked token"),
    "num_sequences zero": ("num_sequences", dict(num_sequences=0), "positive"),
    "num_tokens bool": ("num_tokens", dict(num_tokens=True), "positive"),
    "max_tokens vector": ("max_tokens", dict(max_tokens=torch.ones(2)), "scalar"),
    # normalisers as tensors or numpy scalars: positive and finite
    "num_tokens tensor zero": ("num_tokens", dict(num_tokens=torch.tensor(0.0)), "positive finite"),
    "num_tokens tensor negative": ("num_tokens", dict(num_tokens=torch.tensor([-4])), "positive finite"),
    "num_sequences tensor nan": ("num_sequences", dict(num_sequences=torch.tensor(float("nan"))), "positive finite"),
    "num_sequences tensor inf": ("num_sequences", dict(num_sequences=torch.tensor(float("inf"))), "positive finite"),
    "max_tokens tensor zero": ("max_tokens", dict(max_tokens=torch.tensor(0)), "positive finite"),
    "num_tokens bool tensor": ("num_tokens", dict(num_tokens=torch.tensor(True)), "real count"),
    "num_tokens tensor with grad": ("num_tokens", dict(num_tokens=torch.tensor(4.0, requires_grad=True)), "gradient"),
    "num_tokens meta": ("num_tokens", dict(num_tokens=torch.tensor(4.0, device="meta")), "meta"),
    "num_tokens numpy zero": ("num_tokens", dict(num_tokens=np.float32(0.0)), "positive finite"),
    "num_sequences numpy nan": ("num_sequences", dict(num_sequences=np.float64("nan")), "positive finite"),
    "num_sequences float inf": ("num_sequences", dict(num_sequences=float("inf")), "positive finite"),
    "num_tokens numpy bool": ("num_tokens", dict(num_tokens=np.bool_(True)), "positive finite"),
    "num_tokens string": ("num_tokens", dict(num_tokens="12"), "positive finite"),
    # masks that are not 0/1, tensors on the meta device, advantages with grad
    "mask float weights": ("mask", dict(mask=torch.full((3, 4), 0.5)), "other than 0 and 1"),
    "mask int 2": ("mask", dict(mask=torch.tensor([[1, 2, 0, 0]] * 3)), "other than 0 and 1"),
    "mask nan": ("mask", dict(mask=torch.tensor([[1.0, float("nan"), 0, 0]] * 3)), "other than 0 and 1"),
    "logprobs meta": ("logprobs", dict(logprobs=torch.zeros(3, 4, device="meta"), mask=torch.ones(3, 4, device="meta"),
                                       advantages=torch.zeros(3, device="meta"), old_logprobs=None,
                                       rollout_logprobs=None, ref_logprobs=None), "meta"),
    "advantages with grad": ("advantages", dict(advantages=torch.zeros(3, requires_grad=True)), "gradient"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_malformed_batch_raises_named_error(case):
    field, changes, phrase = BAD[case]
    with pytest.raises(pgzoo.BatchError) as info:
        pgzoo.TokenBatch(**_fields(**changes))
    err = info.value
    assert err.field == field
    assert f"TokenBatch.{field}" in str(err) and "Fix:" in str(err) and phrase in str(err)
    assert isinstance(err, ValueError) and isinstance(err, pgzoo.PgzooError)


def test_required_field_missing_names_it():
    batch = pgzoo.TokenBatch(**_fields(rollout_logprobs=None))
    with pytest.raises(pgzoo.BatchError) as info:
        pgzoo.get("minirl")(batch)
    assert info.value.field == "rollout_logprobs" and "minirl" in str(info.value)


def test_objective_rejects_non_batch():
    with pytest.raises(pgzoo.ConfigError, match="TokenBatch"):
        pgzoo.get("grpo")({"logprobs": torch.zeros(2, 2)})


def test_value_check_is_switchable_and_only_values():
    # check_values=False skips the (host-syncing) finiteness check, never the structural ones
    nan = torch.tensor([[0.0, float("nan")]] * 3)
    pgzoo.TokenBatch(logprobs=nan, mask=torch.ones(3, 2), advantages=torch.zeros(3), check_values=False)
    with pytest.raises(pgzoo.BatchError):
        pgzoo.TokenBatch(**_fields(mask=torch.ones(2, 2)), check_values=False)


def test_nan_at_masked_positions_is_accepted():
    lp = torch.tensor([[0.0, float("nan")]])
    batch = pgzoo.TokenBatch(logprobs=lp, mask=torch.tensor([[1, 0]]), advantages=torch.ones(1),
                             old_logprobs=lp, rollout_logprobs=lp)
    assert batch.mask.dtype == torch.bool


def test_advantage_column_is_squeezed_and_helpers():
    batch = pgzoo.TokenBatch(**_fields(advantages=torch.arange(3.0)[:, None]))
    assert batch.advantages.shape == (3,)
    assert batch.token_advantages().shape == (3, 4)
    assert batch.batch_size == 3 and batch.seq_len == 4


def test_default_normalisers():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]], dtype=torch.bool)
    batch = pgzoo.TokenBatch(logprobs=torch.zeros(3, 3), mask=mask, advantages=torch.zeros(3))
    assert float(batch.sequence_count()) == 2  # the fully masked row does not count
    assert float(batch.token_count()) == 3
    assert batch.length_constant() == 3.0
    assert batch.replace(max_tokens=10).length_constant() == 10.0


def test_aggregate_modes_by_hand():
    term = torch.tensor([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0], [9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    batch = pgzoo.TokenBatch(logprobs=torch.zeros(3, 3), mask=mask, advantages=torch.zeros(3))
    assert float(aggregate(term, batch, "seq-mean-token-sum")) == pytest.approx((3 + 3) / 2)
    assert float(aggregate(term, batch, "seq-mean-token-mean")) == pytest.approx((1.5 + 3) / 2)
    assert float(aggregate(term, batch, "token-mean")) == pytest.approx(6 / 3)
    assert float(aggregate(term, batch, "constant")) == pytest.approx(6 / (2 * 3))
    assert float(aggregate(torch.tensor([1.0, 5.0, 7.0]), batch, "seq-mean")) == pytest.approx(3.0)
    with pytest.raises(pgzoo.ConfigError, match="valid modes"):
        aggregate(term, batch, "mean")


def test_assigning_a_field_drops_derived_views():
    batch = random_batch(4, 5, seed=0, off_policy=False)
    first = pgzoo.get("minirl-no-is")(batch)
    assert float(first.metrics["ratio/max"]) == 1.0  # on-policy: old = lp
    batch.old_logprobs = batch.logprobs.detach() - 0.5  # now every ratio is e^0.5
    second = pgzoo.get("minirl-no-is")(batch)
    torch.testing.assert_close(second.metrics["ratio/min"], torch.tensor(0.5, dtype=torch.float64).exp())
    batch.advantages = torch.zeros(4, dtype=torch.float64)
    assert float(pgzoo.get("minirl-no-is")(batch).loss.detach()) == 0.0


def test_good_normalisers_of_every_kind_are_accepted():
    lp, adv = -torch.rand(3, 4), torch.randn(3)
    losses = []
    for value in (12, 12.0, np.int64(12), np.float32(12.0), torch.tensor(12), torch.tensor([12.0]),
                  torch.tensor(12.0, dtype=torch.float64)):
        batch = pgzoo.TokenBatch(**_fields(num_tokens=value, logprobs=lp.clone().requires_grad_(), advantages=adv,
                                           old_logprobs=lp - 0.1))
        losses.append(pgzoo.get("dapo")(batch).loss)
    torch.testing.assert_close(torch.stack(losses), losses[0].expand(len(losses)))


def test_mask_checks_are_values_and_skip_with_check_values_false():
    ok = pgzoo.TokenBatch(**_fields(mask=torch.tensor([[1.0, 1.0, 0.0, 0.0]] * 3)))
    assert ok.mask.dtype == torch.bool and ok.mask.sum() == 6
    # the mask values check is a value check: check_values=False skips it (the caller's guarantee)
    pgzoo.TokenBatch(**_fields(mask=torch.full((3, 4), 0.5)), check_values=False)


def test_logprobs_without_grad_are_an_error_only_in_grad_mode():
    batch = pgzoo.TokenBatch(**_fields())  # logprobs are a plain tensor
    with pytest.raises(pgzoo.BatchError) as info:
        pgzoo.get("minirl")(batch)
    assert info.value.field == "logprobs" and "no_grad" in str(info.value)
    with torch.no_grad():  # evaluating a loss: fine
        out = pgzoo.get("minirl")(batch)
    with torch.inference_mode():
        assert torch.isfinite(pgzoo.get("grpo")(pgzoo.TokenBatch(**_fields())).loss)
    assert torch.isfinite(out.loss) and not out.loss.requires_grad
    lp = batch.logprobs.clone().requires_grad_()
    assert pgzoo.get("minirl")(batch.replace(logprobs=lp)).loss.requires_grad
