"""Per-token returns of an outcome reward on a response mask, and their whitening over a batch's response tokens.

verl places a completion's outcome reward on its last response token (the last 1 of its response mask) and its
estimators read token returns from there: with discount γ, the return of response token t is γ^k·r, k the number of
response tokens after t. Masked positions inside a row (a multi-turn rollout's tool output) are skipped, not
counted: verl's recursion carries the running return across them unchanged.
"""

from __future__ import annotations

import torch

from pgzoo.advantages.stats import whiten


def tokens_after(mask: torch.Tensor) -> torch.Tensor:
    """``[N, T]``: how many response tokens of the row come after position t (mask ``[N, T]`` of 0/1)."""
    return mask.flip(-1).cumsum(-1).flip(-1) - mask


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """``[N, T]``: G_t = γ^k_t · r at the response tokens (k_t = :func:`tokens_after`), 0 at masked positions.
    γ = 1 gives the reward-to-go of an outcome reward, r at every response token."""
    k = tokens_after(mask)
    scale = torch.ones_like(mask) if gamma == 1.0 else torch.pow(torch.full_like(mask, gamma), k)
    return rewards[:, None] * scale * mask


def whiten_tokens(values: torch.Tensor, mask: torch.Tensor, eps: float) -> torch.Tensor:
    """``[N, T]``: (v − mean) / sqrt(var + eps) with the mean and unbiased variance over the response tokens (mask =
    1) of the whole batch, 0 at masked positions: verl's ``masked_whiten`` followed by ``* response_mask``. Values
    that are all equal, or fewer than two tokens, give zeros."""
    keep = mask.bool()
    out = torch.zeros_like(values)
    tokens = values[keep]
    out[keep] = whiten(tokens, torch.ones_like(tokens), eps)
    return out


__all__ = ["tokens_after", "discounted_returns", "whiten_tokens"]
