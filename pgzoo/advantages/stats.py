"""The statistics the estimators are built from: each row's group, per-group sums, means and unbiased standard
deviations, and the (weighted) whitening of a batch, as verl's ``masked_whiten`` computes it."""

from __future__ import annotations

import torch

from pgzoo.errors import ConfigError
from pgzoo.validate import check_number


def group_index(n: int, group_size: int | None, group_ids, device, *, needed: bool) -> tuple[torch.Tensor, int]:
    """The ``[N]`` group of each row in ``0..num_groups-1`` and ``num_groups``, from ``group_size`` (contiguous groups)
    or ``group_ids`` (any integer labels); without either, each row its own group when groups are not ``needed``."""
    if group_size is None and group_ids is None and not needed:
        return torch.arange(n, device=device), n
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


def group_sum(values: torch.Tensor, index: torch.Tensor, num_groups: int) -> torch.Tensor:
    """``[num_groups, ...]``: the sum of ``values`` (rows first) over each group's rows."""
    return torch.zeros((num_groups, *values.shape[1:]), dtype=values.dtype, device=values.device).index_add(0, index,
                                                                                                     values)


def group_stats(rewards: torch.Tensor, index: torch.Tensor, num_groups: int):
    """Per-row group size, centred reward r − mean_g, unbiased std and a 'group is constant' flag."""
    size = group_sum(torch.ones_like(rewards), index, num_groups)
    mean = group_sum(rewards, index, num_groups) / size
    centred = rewards - mean[index]
    var = group_sum(centred * centred, index, num_groups) / (size - 1).clamp_min(1.0)
    zeros = torch.zeros(num_groups, dtype=rewards.dtype, device=rewards.device)
    gmax = zeros.scatter_reduce(0, index, rewards, "amax", include_self=False)
    gmin = zeros.scatter_reduce(0, index, rewards, "amin", include_self=False)
    constant = (gmax == gmin)[index]
    return size[index], centred, var.sqrt()[index], constant


def zero_where(flag: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """``adv`` with exact zeros where ``flag``."""
    return torch.where(flag, torch.zeros_like(adv), adv)


def whiten(values: torch.Tensor, weights: torch.Tensor, eps: float) -> torch.Tensor:
    """(v − mean_w) / sqrt(var_w + eps) with weighted mean and unbiased (n/(n−1), n = Σ w) weighted variance:
    verl's ``maskedwhiten`` over the tokens when the weights are lengths. A constant batch gives zeros."""
    n = weights.sum()
    if n <= 1 or bool((values == values[0]).all()):
        return torch.zeros_like(values)
    mean = (weights * values).sum() / n
    centred = values - mean
    var = (weights * centred * centred).sum() / n * (n / (n - 1))
    return centred / torch.sqrt(var + eps)


def check_eps(eps, name: str = "eps") -> float:
    """A strictly positive number, or a ConfigError naming the option."""
    return check_number(f"advantages: {name}", eps, low=0.0, low_open=True)


__all__ = ["group_index", "group_sum", "group_stats", "zero_where", "whiten", "check_eps"]
