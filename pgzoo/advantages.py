"""Group-relative advantage estimators: rewards of G completions per prompt → one advantage per completion.

With r_i the reward of completion i and g(i) its group (the prompt it answers), mean_g / std_g the group's mean and
standard deviation (unbiased, as TRL and verl compute it) and G_g its size:

- ``group-mean``      A_i = r_i − mean_g                          (Dr. GRPO; MiniRL)
- ``group-mean-std``  A_i = (r_i − mean_g) / (std_g + eps)        (GRPO, DAPO, CISPO, GSPO)
- ``leave-one-out``   A_i = r_i − mean_{j ∈ g, j ≠ i} r_j = G_g/(G_g − 1) · (r_i − mean_g)   (RLOO)

A group whose rewards are all equal gets exactly zero advantage (never NaN), and so does a group of one.

    >>> pgzoo.advantages.compute("group-mean-std", torch.tensor([1., 0., 0., 0.]), group_size=2)
    tensor([ 0.7071, -0.7071,  0.0000,  0.0000])

Groups are given either as ``group_size`` (rows of one prompt contiguous, prompt-major) or as ``group_ids``
(any integer labels, e.g. ``Rollouts.group``). Custom estimators register with :func:`register`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pgzoo.errors import ConfigError, UnknownNameError

Estimator = Callable[..., torch.Tensor]
_ESTIMATORS: dict[str, Estimator] = {}


def register(name: str, *, override: bool = False):
    """Decorator: register ``fn(rewards, group_index, num_groups, **options) -> advantages`` under ``name``."""

    def _add(fn: Estimator) -> Estimator:
        key = name.lower().replace("_", "-")
        if key in _ESTIMATORS and not override:
            raise ConfigError(f"advantage estimator {key!r} is already registered; pass override=True to replace it")
        _ESTIMATORS[key] = fn
        return fn

    return _add


def available() -> list[str]:
    """Sorted names of the registered estimators."""
    return sorted(_ESTIMATORS)


def _group_index(n: int, group_size: int | None, group_ids, device) -> tuple[torch.Tensor, int]:
    if (group_size is None) == (group_ids is None):
        raise ConfigError("pass exactly one of group_size=G (contiguous groups) or group_ids=[N] labels")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ConfigError(f"group_size must be a positive int, got {group_size!r}")
        if n % group_size:
            raise ConfigError(
                f"group_size={group_size} does not divide the number of rewards {n}; "
                "pass whole groups, or group_ids for ragged groups"
            )
        return torch.arange(n, device=device) // group_size, n // group_size
    ids = torch.as_tensor(group_ids, device=device)
    if ids.dim() != 1 or ids.shape[0] != n:
        raise ConfigError(f"group_ids must be a [N]={n} tensor of labels, got shape {tuple(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ConfigError(f"group_ids must be integer labels, got dtype {ids.dtype}")
    uniq, index = torch.unique(ids, return_inverse=True)
    return index, uniq.numel()


def _group_stats(rewards: torch.Tensor, index: torch.Tensor, num_groups: int):
    """Per-row group size, mean, unbiased std and a 'group is constant' flag."""
    zeros = torch.zeros(num_groups, dtype=rewards.dtype, device=rewards.device)
    size = zeros.index_add(0, index, torch.ones_like(rewards))
    mean = zeros.index_add(0, index, rewards) / size
    centred = rewards - mean[index]
    var = zeros.index_add(0, index, centred * centred) / (size - 1).clamp_min(1.0)
    gmax = zeros.scatter_reduce(0, index, rewards, "amax", include_self=False)
    gmin = zeros.scatter_reduce(0, index, rewards, "amin", include_self=False)
    constant = (gmax == gmin)[index]
    return size[index], centred, var.sqrt()[index], constant


@register("group-mean")
def group_mean(rewards, index, num_groups, **_):
    """A_i = r_i − mean_g (Dr. GRPO, MiniRL)."""
    _, centred, _, constant = _group_stats(rewards, index, num_groups)
    return torch.where(constant, torch.zeros_like(centred), centred)


@register("group-mean-std")
def group_mean_std(rewards, index, num_groups, *, eps: float = 1e-6, **_):
    """A_i = (r_i − mean_g) / (std_g + eps), std unbiased (GRPO)."""
    _, centred, std, constant = _group_stats(rewards, index, num_groups)
    return torch.where(constant, torch.zeros_like(centred), centred / (std + eps))


@register("leave-one-out")
def leave_one_out(rewards, index, num_groups, **_):
    """A_i = r_i − mean of the other rewards in the group = G/(G−1)·(r_i − mean_g) (RLOO)."""
    size, centred, _, constant = _group_stats(rewards, index, num_groups)
    adv = centred * size / (size - 1).clamp_min(1.0)
    return torch.where(constant | (size < 2), torch.zeros_like(adv), adv)


def compute(
    name: str,
    rewards: torch.Tensor,
    *,
    group_size: int | None = None,
    group_ids: torch.Tensor | None = None,
    **options,
) -> torch.Tensor:
    """Advantages ``[N]`` from flat rewards ``[N]`` with the estimator ``name``.

    Args:
        name: ``"group-mean"``, ``"group-mean-std"``, ``"leave-one-out"`` or a registered estimator.
        rewards: ``[N]`` float rewards (finite).
        group_size: G, when the N rows are N/G contiguous groups (prompt-major).
        group_ids: ``[N]`` integer group labels, for ragged or interleaved groups.
        options: estimator options (``eps`` for group-mean-std).
    """
    key = str(name).lower().replace("_", "-")
    if key not in _ESTIMATORS:
        raise UnknownNameError("advantage estimator", key, _ESTIMATORS)
    rewards = torch.as_tensor(rewards)
    if rewards.dim() != 1 or rewards.numel() == 0:
        raise ConfigError(f"rewards must be a non-empty [N] tensor, got shape {tuple(rewards.shape)}")
    if not rewards.dtype.is_floating_point:
        rewards = rewards.to(torch.get_default_dtype())
    if not torch.isfinite(rewards).all():
        raise ConfigError("rewards contain NaN or Inf; fix the reward function (return a finite float per completion)")
    index, num_groups = _group_index(rewards.shape[0], group_size, group_ids, rewards.device)
    return _ESTIMATORS[key](rewards, index, num_groups, **options)
