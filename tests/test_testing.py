"""pgzoo.testing: objectives given as names, objects, or callables returning an ObjectiveOutput or a tensor."""

from __future__ import annotations

import pytest
import torch

import pgzoo
from pgzoo.testing import assert_same_gradient, grad_wrt_logprobs, gradient_cosine, random_batch


def reinforce(b):
    """−Σ A·lp / N_seq as a bare tensor: minirl-no-is on policy."""
    return -(b.token_advantages() * b.masked(b.logprobs)).sum() / b.sequence_count()


def test_callable_returning_a_tensor_or_an_output():
    batch = random_batch(5, 7, seed=2, off_policy=False, pad_value=float("nan"))
    assert_same_gradient("minirl-no-is", reinforce, batch)
    assert_same_gradient(reinforce, lambda b: pgzoo.ObjectiveOutput(reinforce(b), {}), batch)
    assert_same_gradient(pgzoo.get("minirl-no-is"), lambda b: reinforce(b).reshape(1), batch)  # [1] is a scalar
    assert gradient_cosine(reinforce, "minirl-no-is", batch) == pytest.approx(1.0)


def test_a_different_gradient_is_caught():
    batch = random_batch(5, 7, seed=2, off_policy=False)
    with pytest.raises(AssertionError, match="gradients differ"):
        assert_same_gradient("minirl-no-is", lambda b: 2 * reinforce(b), batch)


def test_works_under_no_grad_and_for_constant_losses():
    batch = random_batch(3, 4, seed=0)
    with torch.no_grad():
        g = grad_wrt_logprobs("grpo", batch)
    assert g[batch.mask].abs().sum() > 0
    assert (grad_wrt_logprobs(lambda b: torch.tensor(1.0), batch) == 0).all()


@pytest.mark.parametrize("bad,match", [(lambda b: 1.0, "returned float"),
                                       (lambda b: reinforce(b).expand(2), "shape"),
                                       (lambda b: {"loss": reinforce(b)}, "returned dict")])
def test_bad_returns_are_named(bad, match):
    with pytest.raises(pgzoo.ConfigError, match=match):
        grad_wrt_logprobs(bad, random_batch(3, 4, seed=0))
