"""The estimator registry and what an estimator declares about itself.

An estimator is a function ``fn(rewards, index, num_groups, **options) -> advantages``: ``rewards`` a float ``[N]``
tensor of outcome rewards, ``index`` the ``[N]`` group of each row in ``0..num_groups-1``. It returns ``[N]`` (one
advantage per completion) or, given a response mask, ``[N, T]`` (one per token). Three attributes, all optional,
declare what it needs; callers (:func:`pgzoo.advantages.compute`, pgzoo's trainer, the verl adapter) read them and
never an estimator's name:

- ``uses_groups = False``: it may be called without groups (``reinforce++``, ``remax``, ``reward``).
- ``token_inputs``: the names of the ``[N, T]`` per-token tensors it reads, ``response_mask`` among them. Such an
  estimator may return ``[N, T]`` advantages; ``compute`` checks every one of these tensors against the response
  mask's shape, zeroes them at masked positions and checks the result's shape.
- ``inputs``: the inputs it cannot run without that pgzoo's trainer does not produce when it computes advantages
  (``remax``: ``baseline_rewards``); :func:`trainer_estimators` leaves these out.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pgzoo.registry import Registry

Estimator = Callable[..., torch.Tensor]
registry = Registry("advantage estimator", "pgzoo.advantages", builtins="pgzoo.advantages",
                    describe="a function fn(rewards, index, num_groups, **options) -> advantages")


def register(name: str, *, override: bool = False):
    """Decorator: register ``fn(rewards, index, num_groups, **options) -> advantages`` under ``name``.

    An estimator that takes a ``lengths`` argument receives the completions' ``[N]`` lengths when the caller gives
    them (or a response mask they are the row sums of); the attributes ``uses_groups``, ``token_inputs`` and
    ``inputs`` declare the rest (this module's docstring).
    """
    return registry.register(name, override=override)


def unregister(name: str) -> None:
    """Remove a registered estimator (mainly for tests)."""
    registry.unregister(name)


def available(pattern: str = "*") -> list[str]:
    """Sorted names of the registered estimators (shell-style wildcard filter)."""
    return registry.available(pattern)


def token_inputs(name: str) -> tuple[str, ...]:
    """The ``[N, T]`` per-token tensors estimator ``name`` reads (empty: an outcome estimator, ``[N]`` only)."""
    return tuple(getattr(registry.get(name), "token_inputs", ()))


def trainer_estimators() -> list[str]:
    """The estimators pgzoo's trainer can run from rewards, lengths and the response mask (every one without
    ``inputs``)."""
    return [name for name in available() if not getattr(registry.get(name), "inputs", ())]


__all__ = ["Estimator", "registry", "register", "unregister", "available", "token_inputs", "trainer_estimators"]
