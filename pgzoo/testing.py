"""Helpers for comparing objectives in your own unit tests.

    from pgzoo.testing import random_batch, grad_wrt_logprobs, assert_same_gradient, gradient_cosine

    batch = random_batch(8, 16, seed=0)                      # float64, padded, off-policy, rollout + ref logprobs
    g = grad_wrt_logprobs("minirl", batch)                   # [B, T] = ∂ loss / ∂ logprobs
    assert_same_gradient("grpo", MyGRPO(), batch)            # raises AssertionError with the largest difference
    gradient_cosine("minirl", "minirl-no-is", batch)         # -> float in [-1, 1]

Objectives may be given as registered names or as callables ``TokenBatch -> ObjectiveOutput`` or
``TokenBatch -> scalar loss tensor`` (e.g. a hand-written reference loss).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pgzoo.batch import TokenBatch
from pgzoo.errors import ConfigError

ObjectiveLike = str | Callable


def _resolve(objective: ObjectiveLike) -> Callable:
    if isinstance(objective, str):
        from pgzoo.objectives.registry import get

        return get(objective)
    if not callable(objective):
        raise ConfigError(f"expected an objective name or callable, got {type(objective).__name__}")
    return objective


def random_batch(
    batch_size: int = 4,
    seq_len: int = 8,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    off_policy: bool = True,
    rollout: bool = True,
    ref: bool = True,
    per_token_advantages: bool = False,
    padding: bool = True,
    fully_masked_row: bool = False,
    pad_value: float | None = None,
    scale: float = 0.3,
    **batch_kwargs,
) -> TokenBatch:
    """A random, valid :class:`TokenBatch` with ``logprobs`` requiring grad.

    Args:
        batch_size, seq_len: B and T.
        seed: seed of a private generator (the global RNG is untouched).
        dtype: floating dtype of every tensor (float64 makes gradient comparisons exact to ~1e-12).
        off_policy: give ``old_logprobs`` = lp + scale·noise (else None: on-policy).
        rollout: give ``rollout_logprobs`` = old + scale·noise (the training–inference discrepancy).
        ref: give ``ref_logprobs`` = lp + scale·noise.
        per_token_advantages: advantages ``[B, T]`` instead of ``[B]``.
        padding: right-pad rows to random lengths in [1, T] (else every token counts).
        fully_masked_row: make the last row fully masked (a row that must contribute nothing).
        pad_value: if given, write this value (e.g. ``float("nan")``) at every masked position of every field.
        scale: size of the log-ratio noise between lp, old, mu and ref.
        batch_kwargs: passed to TokenBatch (``num_sequences``, ``num_tokens``, ``max_tokens``, ...).
    """
    g = torch.Generator().manual_seed(seed)

    def noise(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    B, T = batch_size, seq_len
    lp = -(torch.rand(B, T, generator=g, dtype=dtype) * 3.0 + 0.05)
    if padding:
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        mask = torch.arange(T)[None, :] < lengths[:, None]
    else:
        mask = torch.ones(B, T, dtype=torch.bool)
    if fully_masked_row:
        if B < 2:
            raise ConfigError("fully_masked_row needs batch_size >= 2 (a batch needs at least one token)")
        mask[-1] = False
    old = lp + scale * noise(B, T) if off_policy else None
    base = old if old is not None else lp
    mu = base + scale * noise(B, T) if rollout else None
    ref_lp = lp + scale * noise(B, T) if ref else None
    adv = noise(B, T) if per_token_advantages else noise(B)

    def pad(x):
        if x is None or pad_value is None:
            return x
        return torch.where(mask, x, torch.full_like(x, pad_value))

    return TokenBatch(
        logprobs=pad(lp).requires_grad_(),
        mask=mask,
        advantages=adv if adv.dim() == 1 else pad(adv),
        old_logprobs=pad(old),
        rollout_logprobs=pad(mu),
        ref_logprobs=pad(ref_lp),
        **batch_kwargs,
    )


def _loss_of(out, objective) -> torch.Tensor:
    """The scalar loss of what an objective-like callable returned: an ObjectiveOutput or a 0-d tensor."""
    from pgzoo.objectives.base import ObjectiveOutput

    loss = out.loss if isinstance(out, ObjectiveOutput) else out
    if not isinstance(loss, torch.Tensor):
        raise ConfigError(f"{getattr(objective, '__name__', objective)!r} returned {type(out).__name__}; an objective "
                          "callable must return a pgzoo.ObjectiveOutput or a scalar loss tensor")
    if loss.numel() != 1:
        raise ConfigError(f"{getattr(objective, '__name__', objective)!r} returned a loss of shape "
                          f"{tuple(loss.shape)}; reduce it to a scalar (e.g. with pgzoo.aggregate)")
    return loss.reshape(())


def grad_wrt_logprobs(objective: ObjectiveLike, batch: TokenBatch) -> torch.Tensor:
    """∂ loss / ∂ logprobs ``[B, T]`` of ``objective`` on ``batch`` (a fresh leaf; ``batch`` is not modified)."""
    obj = _resolve(objective)
    lp = batch.logprobs.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = _loss_of(obj(batch.replace(logprobs=lp)), objective)
    if not loss.requires_grad:  # a loss that does not depend on logprobs at all: its gradient is zero
        return torch.zeros_like(lp)
    (grad,) = torch.autograd.grad(loss, lp, allow_unused=True)
    return torch.zeros_like(lp) if grad is None else grad


def assert_same_gradient(
    a: ObjectiveLike, b: ObjectiveLike, batch: TokenBatch, *, rtol: float = 1e-6, atol: float = 1e-9
) -> None:
    """Assert that ``a`` and ``b`` have the same gradient w.r.t. ``logprobs`` on ``batch`` (unmasked positions).

    ``a`` and ``b`` are registered names, objectives, or callables ``TokenBatch -> ObjectiveOutput | scalar
    tensor``::

        on_policy = random_batch(off_policy=False)     # minirl-no-is on policy is plain REINFORCE:
        assert_same_gradient("minirl-no-is", lambda b: -(b.token_advantages() * b.masked(b.logprobs)).sum()
                             / b.sequence_count(), on_policy)

    Raises ``AssertionError`` naming the largest absolute difference and where it is.
    """
    ga, gb = grad_wrt_logprobs(a, batch), grad_wrt_logprobs(b, batch)
    mask = batch.mask
    ga = torch.where(mask, ga, torch.zeros_like(ga))
    gb = torch.where(mask, gb, torch.zeros_like(gb))
    close = torch.isclose(ga, gb, rtol=rtol, atol=atol)
    if not bool(close.all()):
        diff = (ga - gb).abs()
        idx = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0])
        raise AssertionError(
            f"gradients differ: max |Δ| = {diff.max().item():.3e} at {idx} "
            f"({ga[idx].item():.6e} vs {gb[idx].item():.6e}); rtol={rtol}, atol={atol}"
        )


def gradient_cosine(a: ObjectiveLike, b: ObjectiveLike, batch: TokenBatch) -> float:
    """Cosine similarity of the two objectives' gradients w.r.t. ``logprobs`` over unmasked positions."""
    ga, gb = grad_wrt_logprobs(a, batch), grad_wrt_logprobs(b, batch)
    ga, gb = ga[batch.mask].double(), gb[batch.mask].double()
    denom = ga.norm() * gb.norm()
    if denom == 0:
        raise ConfigError("a gradient is exactly zero on this batch, so the cosine is undefined; use another batch")
    return float(ga @ gb / denom)
