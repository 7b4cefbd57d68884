"""Routing drift: how often two route tensors send a token to a different *set* of experts.

For route tensors a, b of shape ``[..., L, k]`` (e.g. ``[B, S, L_moe, k]``), token position t and MoE layer ℓ:

    differs(t, ℓ) = 1[ set(a[t, ℓ]) ≠ set(b[t, ℓ]) ]          (order within the top-k does not matter)
    overlap(t, ℓ) = |set(a[t, ℓ]) ∩ set(b[t, ℓ])| / k

averaged over valid slots: positions where ``mask`` is true and neither tensor holds -1 (UNROUTED).
Use it between the rollout engine's routes and the training engine's (training–inference routing drift, what R3
removes) or between θ_old's and θ's (staleness routing drift, what R2 removes).
"""

from __future__ import annotations

import torch

from pgzoo.errors import RoutingError
from pgzoo.routing.record import UNROUTED


def routing_drift(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Share of tokens whose expert set differs between ``a`` and ``b``, per MoE layer and overall.

    Args:
        a, b: integer expert ids ``[..., L, k]`` of the same shape.
        mask: bool/0-1 ``[...]`` (``a.shape[:-2]``, e.g. the attention or completion mask ``[B, S]``): positions
            that count. Default: all.

    Returns:
        Detached float tensors (no host sync):

        - ``drift``: mean over valid (token, layer) slots of ``differs``;
        - ``drift_any_layer``: share of valid tokens whose set differs in at least one layer;
        - ``expert_overlap``: mean ``overlap`` over valid slots (1 = identical sets);
        - ``drift_layer_{i}``: ``drift`` restricted to MoE layer slot ``i``;
        - ``num_slots``: number of valid (token, layer) slots (0 gives drift 0).

    Example:
        >>> a = torch.tensor([[[[0, 1]], [[2, 3]]]])          # [B=1, S=2, L=1, k=2]
        >>> b = torch.tensor([[[[1, 0]], [[2, 4]]]])
        >>> routing_drift(a, b)["drift"]                      # token 0 same set, token 1 differs
        tensor(0.5000)
    """
    return drift_from_counts(drift_counts(a, b, mask))


def drift_counts(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Additive counts behind :func:`routing_drift` (sum them over micro-batches, then :func:`drift_from_counts`).

    Keys: ``differs`` ``[L]``, ``valid`` ``[L]``, ``overlap`` ``[L]`` (summed over valid slots),
    ``tokens_differ`` and ``tokens`` (scalars: valid tokens, and those differing in at least one layer).
    """
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise RoutingError("routing_drift(a, b): both route tensors must be torch tensors")
    if a.shape != b.shape or a.dim() < 2:
        raise RoutingError(
            f"routing_drift: route shapes differ or lack [L, k] axes: {tuple(a.shape)} vs {tuple(b.shape)}"
        )
    b = b.to(a.device)
    with torch.no_grad():
        valid = (a != UNROUTED).all(-1) & (b != UNROUTED).all(-1)  # [..., L]
        if mask is not None:
            if tuple(mask.shape) != tuple(a.shape[:-2]):
                raise RoutingError(
                    f"routing_drift: mask shape {tuple(mask.shape)} must equal the routes' leading shape "
                    f"{tuple(a.shape[:-2])}"
                )
            valid = valid & mask.to(a.device).bool()[..., None]
        differs = (a.sort(-1).values != b.sort(-1).values).any(-1) & valid
        overlap = (a[..., :, None] == b[..., None, :]).any(-1).float().mean(-1) * valid
        lead = tuple(range(valid.dim() - 1))
        return {
            "differs": differs.float().sum(lead),
            "valid": valid.float().sum(lead),
            "overlap": overlap.sum(lead),
            "tokens_differ": differs.any(-1).float().sum(),
            "tokens": valid.any(-1).float().sum(),
        }


def drift_from_counts(counts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The :func:`routing_drift` metrics from (summed) :func:`drift_counts`."""
    n_slots = counts["valid"].sum()
    out = {
        "drift": counts["differs"].sum() / n_slots.clamp(min=1),
        "drift_any_layer": counts["tokens_differ"] / counts["tokens"].clamp(min=1),
        "expert_overlap": torch.where(n_slots > 0, counts["overlap"].sum() / n_slots.clamp(min=1), 1.0),
        "num_slots": n_slots,
    }
    per_layer = counts["differs"] / counts["valid"].clamp(min=1)
    for i in range(per_layer.shape[0]):
        out[f"drift_layer_{i}"] = per_layer[i]
    return out
