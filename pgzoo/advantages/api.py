"""``compute``: one estimator on a batch of outcome rewards, with every input checked and the result's shape too."""

from __future__ import annotations

import inspect

import torch

from pgzoo.advantages.base import registry
from pgzoo.advantages.stats import group_index
from pgzoo.errors import ConfigError


def check_lengths(lengths, n: int, like: torch.Tensor) -> torch.Tensor:
    lengths = torch.as_tensor(lengths, device=like.device)
    if lengths.dim() != 1 or lengths.shape[0] != n:
        raise ConfigError(f"lengths must be a [N]={n} tensor (one length per completion), got shape "
                          f"{tuple(lengths.shape)}")
    if lengths.dtype == torch.bool or lengths.dtype.is_complex:
        raise ConfigError(f"lengths must be numbers of tokens, got dtype {lengths.dtype}")
    lengths = lengths.to(like.dtype)
    if not bool((torch.isfinite(lengths) & (lengths > 0)).all()):
        raise ConfigError("lengths must be positive finite token counts (every completion has at least one token: "
                          "its end-of-sequence or its last token before truncation)")
    return lengths


def check_response_mask(mask, n: int, like: torch.Tensor) -> torch.Tensor:
    """The ``[N, T]`` response mask as 0/1 in the rewards' dtype; every row holds at least one token."""
    mask = torch.as_tensor(mask, device=like.device)
    if mask.dim() != 2 or mask.shape[0] != n or mask.shape[1] == 0:
        raise ConfigError(f"response_mask must be a [N={n}, T] tensor (1 at each completion token, 0 at padding), "
                          f"got shape {tuple(mask.shape)}")
    if mask.dtype.is_complex:
        raise ConfigError(f"response_mask must be bool or 0/1 numbers, got dtype {mask.dtype}")
    mask = mask.to(like.dtype)
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ConfigError("response_mask must hold only 0 and 1 (or False/True)")
    if not bool((mask.sum(-1) > 0).all()):
        raise ConfigError("response_mask has a row without tokens: every completion has at least one token (its "
                          "end-of-sequence or its last token before truncation)")
    return mask


def check_token_input(name: str, value, mask: torch.Tensor) -> torch.Tensor:
    """A per-token ``[N, T]`` input in the rewards' dtype, finite at the response tokens, 0 at masked positions
    (whatever they held, NaN included, never reaches the estimator)."""
    value = torch.as_tensor(value, device=mask.device)
    if tuple(value.shape) != tuple(mask.shape):
        raise ConfigError(f"{name} must be per token, shaped like response_mask {tuple(mask.shape)}, got shape "
                          f"{tuple(value.shape)}")
    if value.dtype == torch.bool or value.dtype.is_complex:
        raise ConfigError(f"{name} must be real numbers, got dtype {value.dtype}")
    value = value.to(mask.dtype)
    keep = mask.bool()
    if not bool(torch.isfinite(value[keep]).all()):
        raise ConfigError(f"{name} holds NaN or Inf at a response token (response_mask = 1); fix its source")
    return torch.where(keep, value, torch.zeros_like(value))


def compute(
    name: str,
    rewards: torch.Tensor,
    *,
    group_size: int | None = None,
    group_ids: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    response_mask: torch.Tensor | None = None,
    **options,
) -> torch.Tensor:
    """Advantages from flat outcome rewards ``[N]`` with the estimator ``name``: ``[N]`` (one per completion) or,
    for an estimator that gives them and a ``response_mask``, ``[N, T]`` (one per token, 0 at masked positions).

    Args:
        name: a registered estimator (see :func:`available`), e.g. ``"group-mean-std"`` or ``"rloo"``.
        rewards: ``[N]`` float rewards (finite).
        group_size: G, when the N rows are N/G contiguous groups (prompt-major).
        group_ids: ``[N]`` integer group labels, for ragged or interleaved groups.
        lengths: ``[N]`` completion lengths in tokens (positive); used by the estimators that take them
            (``opo`` needs them; ``reinforce++`` and ``reinforce++-baseline`` weight by them), ignored by the rest.
            Default with a ``response_mask``: its row sums (when both are given they must agree).
        response_mask: ``[N, T]`` 0/1, 1 at each completion token; the per-token estimators read it (``reinforce++``
            with ``gamma < 1``, ``optimal-token-baseline``). The outcome reward belongs to the row's last token.
        options: estimator options (``eps``, ``k``, ``gamma``, ...) and the estimator's other per-token ``[N, T]``
            inputs (``old_logprobs``, ``sum_pi_squared``, ...: its ``token_inputs``), checked against the response
            mask's shape; an option the estimator does not take raises.
    """
    key, fn, defaults = registry.entry(name)
    rewards = torch.as_tensor(rewards)
    if rewards.dim() != 1 or rewards.numel() == 0:
        raise ConfigError(f"rewards must be a non-empty [N] tensor, got shape {tuple(rewards.shape)}")
    if not rewards.dtype.is_floating_point:
        rewards = rewards.to(torch.get_default_dtype())
    if not torch.isfinite(rewards).all():
        raise ConfigError("rewards contain NaN or Inf; fix the reward function (return a finite float per completion)")
    n = rewards.shape[0]
    params = inspect.signature(fn).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    valid = [p for p in list(params)[3:] if params[p].kind is not params[p].VAR_KEYWORD]
    unknown = sorted(set(options) - set(valid) - {"lengths", "response_mask"})
    if unknown and not takes_any:
        raise ConfigError(f"advantage estimator {key!r} has no option(s) {', '.join(map(repr, unknown))}; "
                          f"valid: {', '.join(o for o in valid if o not in ('lengths', 'response_mask')) or '(none)'}")
    index, num_groups = group_index(n, group_size, group_ids, rewards.device, needed=getattr(fn, "uses_groups", True))
    kwargs = {**defaults, **options}
    mask = None
    if response_mask is not None:
        mask = check_response_mask(response_mask, n, rewards)
        if lengths is None:
            lengths = mask.sum(-1)
        elif not torch.equal(check_lengths(lengths, n, rewards), mask.sum(-1)):
            raise ConfigError("lengths disagree with response_mask's row sums; pass one of them (lengths default to "
                              "response_mask.sum(-1))")
        if "response_mask" in params or takes_any:
            kwargs["response_mask"] = mask
    for token_input in getattr(fn, "token_inputs", ()):
        if token_input == "response_mask" or kwargs.get(token_input) is None:
            continue
        if mask is None:
            raise ConfigError(f"advantage estimator {key!r}: {token_input} is per token [N, T]; pass "
                              f"response_mask=[N, T] with it")
        kwargs[token_input] = check_token_input(token_input, kwargs[token_input], mask)
    if lengths is not None:
        lengths = check_lengths(lengths, n, rewards)
        if "lengths" in params or takes_any:
            kwargs["lengths"] = lengths
    adv = fn(rewards, index, num_groups, **kwargs)
    if tuple(adv.shape) == (n,):
        return adv
    if mask is not None and tuple(adv.shape) == tuple(mask.shape):
        return torch.where(mask.bool(), adv, torch.zeros_like(adv))
    expected = f"[N]={n}" + ("" if mask is None else f" or [N, T]={tuple(mask.shape)}")
    raise ConfigError(f"advantage estimator {key!r} returned shape {tuple(adv.shape)}, expected {expected}")


__all__ = ["compute", "check_lengths", "check_response_mask", "check_token_input"]
