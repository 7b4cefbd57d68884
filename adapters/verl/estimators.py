"""pgzoo advantage estimators as verl 0.9.1 advantage estimators (``register_adv_est``).

verl calls a registered estimator as ``fn(token_level_rewards, response_mask, config, index=uids, ...)`` and
stores the ``(advantages, returns)`` it returns. pgzoo's estimators take outcome rewards: the reward is the row's sum
of token-level rewards (verl places the outcome reward on the last response token), the group is the prompt's
``uid`` and the response mask is verl's (lengths: its row sums). An advantage per completion is broadcast over the
response tokens; a per-token estimator's ``[N, T]`` advantages are returned as they are (returns = advantages, as
verl's outcome estimators). A per-token estimator's other inputs (its ``token_inputs``) are taken from the keywords
verl passes under verl's names (``old_log_probs``, ``sum_pi_squared``, ``rollout_is_weights``). Options come from the
estimator's defaults, overridden by the mapping ``algorithm.pgzoo`` (``+algorithm.pgzoo.k=4``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

import pgzoo
from pgzoo.adapters.verl.names import PREFIX, VERL_TOKEN_INPUT
from pgzoo.errors import ConfigError


def _options(config) -> dict[str, Any]:
    options = config.get("pgzoo", None) if config is not None else None
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise ConfigError(f"algorithm.pgzoo={options!r} must be a mapping of the estimator's options, "
                          f"e.g. +algorithm.pgzoo.k=4")
    return {str(k): v for k, v in options.items()}


def make_estimator(name: str):
    """verl's advantage-estimator function for the pgzoo estimator ``name`` (registered as ``pgzoo/<name>``)."""

    def estimator(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, config=None, index=None,
                  **verl_extras) -> tuple[torch.Tensor, torch.Tensor]:
        # verl passes further keywords to some estimators (reward_baselines, non_tensor_batch, ...): pgzoo's read
        # only the per-token inputs they declare
        mask = response_mask.to(token_level_rewards.dtype)
        per_token = {pgzoo_name: verl_extras[verl_name] for pgzoo_name, verl_name in VERL_TOKEN_INPUT.items()
                     if pgzoo_name in pgzoo.advantages.token_inputs(name) and verl_extras.get(verl_name) is not None}
        with torch.no_grad():
            rewards = (token_level_rewards * mask).sum(-1)
            group_ids = None
            if index is not None:
                labels: dict[Any, int] = {}
                group_ids = torch.tensor([labels.setdefault(u, len(labels)) for u in list(index)],
                                         device=rewards.device)
            adv = pgzoo.advantages.compute(name, rewards, group_ids=group_ids, response_mask=mask,
                                           **per_token, **_options(config))
            advantages = adv.to(mask.dtype)[:, None] * mask if adv.dim() == 1 else adv.to(mask.dtype)
        return advantages, advantages

    estimator.__name__ = f"pgzoo_{name.replace('-', '_').replace('+', 'p')}_advantage"
    estimator.__qualname__ = estimator.__name__
    estimator.__doc__ = f"pgzoo's {name!r} advantage estimator as a verl estimator ({PREFIX}{name})."
    return estimator


__all__ = ["make_estimator"]
