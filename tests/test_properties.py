"""Hypothesis properties of every objective: padding values and length, row permutation, finiteness."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pgzoo
from pgzoo.testing import random_batch

NAMES = [
    "minirl", "minirl-no-clip", "minirl-length-norm", "minirl-no-is",
    "grpo", "dr-grpo", "dapo", "cispo", "gspo", "gspo-token",
]
FIELDS = ("old_logprobs", "rollout_logprobs", "ref_logprobs")
SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _objective(name):
    return pgzoo.get(name, beta=0.05) if name == "grpo" else pgzoo.get(name)


def _loss_and_grad(obj, batch):
    lp = batch.logprobs.detach().clone().requires_grad_(True)
    out = obj(batch.replace(logprobs=lp))
    (g,) = torch.autograd.grad(out.loss, lp)
    return out, g


shapes = st.tuples(st.integers(1, 5), st.integers(1, 6), st.integers(0, 10_000), st.booleans())
any_float = st.floats(allow_nan=True, allow_infinity=True, width=64)


@pytest.mark.parametrize("name", NAMES)
@SETTINGS
@given(shape=shapes, extra=st.integers(0, 4), fill=any_float, scale=st.sampled_from([1e-4, 0.3, 3.0]))
def test_padding_values_and_length_do_not_matter(name, shape, extra, fill, scale):
    B, T, seed, per_token = shape
    # max_tokens pinned: Dr. GRPO's constant L defaults to the padded length T, by definition
    base = random_batch(B, T, seed=seed, scale=scale, per_token_advantages=per_token, max_tokens=T)

    def pad(x):
        if x is None:
            return None
        return torch.cat([torch.where(base.mask, x.detach(), torch.full_like(x, fill)),
                          torch.full((B, extra), fill, dtype=x.dtype)], 1)

    padded = pgzoo.TokenBatch(
        logprobs=pad(base.logprobs), mask=torch.cat([base.mask, torch.zeros(B, extra, dtype=torch.bool)], 1),
        advantages=pad(base.advantages) if base.advantages.dim() == 2 else base.advantages,
        **{f: pad(getattr(base, f)) for f in FIELDS}, max_tokens=T,
    )
    obj = _objective(name)
    out_a, g_a = _loss_and_grad(obj, base)
    out_b, g_b = _loss_and_grad(obj, padded)
    torch.testing.assert_close(out_b.loss, out_a.loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g_b[:, :T], g_a, rtol=1e-12, atol=1e-14)
    assert (g_b[:, T:] == 0).all() and (g_b[:, :T][~base.mask] == 0).all()
    for key in out_a.metrics:
        torch.testing.assert_close(out_b.metrics[key], out_a.metrics[key], rtol=1e-9, atol=1e-12, msg=key)


@pytest.mark.parametrize("name", NAMES)
@SETTINGS
@given(shape=shapes, perm_seed=st.integers(0, 1000), scale=st.sampled_from([1e-4, 0.3, 3.0]))
def test_permuting_sequences_permutes_the_gradient(name, shape, perm_seed, scale):
    B, T, seed, per_token = shape
    batch = random_batch(B, T, seed=seed, scale=scale, per_token_advantages=per_token)
    perm = torch.randperm(B, generator=torch.Generator().manual_seed(perm_seed))
    permuted = pgzoo.TokenBatch(
        logprobs=batch.logprobs.detach()[perm], mask=batch.mask[perm], advantages=batch.advantages[perm],
        **{f: getattr(batch, f)[perm] for f in FIELDS},
    )
    obj = _objective(name)
    out_a, g_a = _loss_and_grad(obj, batch)
    out_b, g_b = _loss_and_grad(obj, permuted)
    torch.testing.assert_close(out_b.loss, out_a.loss, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(g_b, g_a[perm], rtol=1e-10, atol=1e-13)


finite = st.floats(min_value=-60.0, max_value=0.0, allow_nan=False, width=32)


@pytest.mark.parametrize("name", NAMES)
@SETTINGS
@given(
    data=st.data(),
    B=st.integers(1, 4),
    T=st.integers(1, 5),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_finite_inputs_give_finite_outputs(name, data, B, T, dtype):
    def tensor(shape, elements):
        values = data.draw(st.lists(elements, min_size=B * T if shape == 2 else B,
                                    max_size=B * T if shape == 2 else B))
        return torch.tensor(values, dtype=dtype).reshape((B, T) if shape == 2 else (B,))

    mask = torch.tensor(data.draw(st.lists(st.booleans(), min_size=B * T, max_size=B * T))).reshape(B, T)
    mask[0, 0] = True  # at least one token
    lp = tensor(2, finite).requires_grad_(True)
    batch = pgzoo.TokenBatch(
        logprobs=lp, mask=mask,
        advantages=tensor(1, st.floats(-1e3, 1e3, width=32)),
        old_logprobs=tensor(2, finite), rollout_logprobs=tensor(2, finite), ref_logprobs=tensor(2, finite),
    )
    out = _objective(name)(batch)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert torch.isfinite(lp.grad).all()
    for key, value in out.metrics.items():
        assert torch.isfinite(value).all(), key
