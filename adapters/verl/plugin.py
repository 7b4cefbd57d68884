"""The ``verl.plugins`` entry point of pgzoo: importing this module (verl does on ``import verl`` unless
``VERL_USE_EXTERNAL_PLUGINS=none``, or a list of plugin names without ``pgzoo``) registers

* every objective of :func:`pgzoo.available` as the verl policy loss ``pgzoo/<name>``;
* every pgzoo advantage estimator without a verl equivalent (:data:`pgzoo.adapters.verl.names.VERL_ESTIMATOR`) as
  the verl advantage estimator ``pgzoo/<name>``.

verl's own names are never replaced: a prefixed name already taken by something else raises.
"""

from __future__ import annotations

from verl.trainer.ppo import core_algos

import pgzoo
from pgzoo.adapters.verl.estimators import make_estimator
from pgzoo.adapters.verl.names import PREFIX, VERL_ESTIMATOR
from pgzoo.adapters.verl.policy_loss import make_policy_loss
from pgzoo.errors import ConfigError


def register() -> tuple[list[str], list[str]]:
    """Register the losses and estimators (idempotent); returns the verl names ``(losses, estimators)``."""
    losses, estimators = [], []
    for name in pgzoo.available():
        key = PREFIX + name
        current = core_algos.POLICY_LOSS_REGISTRY.get(key)
        if current is not None and getattr(current, "__module__", "") != make_policy_loss.__module__:
            raise ConfigError(f"verl policy loss {key!r} is already registered by {current.__module__}; "
                              f"pgzoo will not replace it (uninstall the other plugin or rename it)")
        if current is None:
            core_algos.register_policy_loss(key)(make_policy_loss(name))
        losses.append(key)
    for name in pgzoo.advantages.available():
        if name in VERL_ESTIMATOR:
            continue
        key = PREFIX + name
        if key not in core_algos.ADV_ESTIMATOR_REGISTRY:
            core_algos.register_adv_est(key)(make_estimator(name))
        estimators.append(key)
    return losses, estimators


LOSSES, ESTIMATORS = register()

__all__ = ["register", "LOSSES", "ESTIMATORS"]
