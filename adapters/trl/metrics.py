"""An objective's metrics in TRL's logs: one collective per micro-batch, each name reduced over processes by its
kind (``*_max``/``*/max`` the max, ``*_min``/``*/min`` the min, everything else the mean), as both TRL adapters
log them under ``pgzoo/<name>``.
"""

from __future__ import annotations

from typing import Any

import torch


def reduce_kind(name: str) -> str:
    """``"max"``, ``"min"`` or ``"mean"``: how the metric ``name`` reduces over processes and logging steps."""
    leaf = name.rsplit("/", 1)[-1]
    if leaf == "max" or leaf.endswith("_max"):
        return "max"
    if leaf == "min" or leaf.endswith("_min"):
        return "min"
    return "mean"


def reduce_over_processes(accelerator: Any, metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    """The scalar tensors of ``metrics`` reduced over ``accelerator``'s processes (one gather, one host sync);
    non-scalar entries are left out. Every process must call it with the same names."""
    names = sorted(k for k, v in metrics.items() if isinstance(v, torch.Tensor) and v.numel() == 1)
    if not names:
        return {}
    local = torch.stack([metrics[k].detach().float().reshape(()).to(accelerator.device) for k in names])
    gathered = accelerator.gather(local.unsqueeze(0)).view(-1, len(names))
    reduced = torch.stack([
        col.max() if kind == "max" else col.min() if kind == "min" else col.nanmean()
        for col, kind in zip(gathered.t(), map(reduce_kind, names))
    ]).tolist()
    return dict(zip(names, reduced))


__all__ = ["reduce_kind", "reduce_over_processes"]
