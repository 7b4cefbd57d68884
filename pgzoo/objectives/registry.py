"""The objective registry: ``pgzoo.get / register / available`` (entry-point group ``pgzoo.objectives``).

    @pgzoo.register("my-loss")
    class MyLoss(pgzoo.Objective): ...

    pgzoo.register("minirl-no-clip", MiniRL, clip=False)   # a variant = a class plus default overrides
    pgzoo.get("minirl", eps_high=0.3)       # -> configured instance
    pgzoo.available("minirl*")              # -> sorted names
"""

from __future__ import annotations

from typing import Any

from pgzoo.objectives.base import Objective
from pgzoo.registry import Registry


def _is_objective(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, Objective)


def _check_objective_defaults(cls: type, defaults: dict) -> None:
    cls.validate_overrides(defaults)


objectives = Registry("objective", "pgzoo.objectives", builtins="pgzoo.objectives", accepts=_is_objective,
                      describe="a pgzoo.Objective subclass", check_defaults=_check_objective_defaults)

ENTRY_POINT_GROUP = objectives.group


# ---------------------------------------------------------------------------- the objective API (pgzoo.get, ...)
def register(name: Any = None, factory: Any = None, *, override: bool = False, **defaults):
    """Register an objective class under ``name``, optionally with default config overrides.

    Use as a decorator (``@register("name")`` or bare ``@register``, which takes the class's ``name`` attribute)
    or as a call (``register("name", Class, **defaults)``). A duplicate name raises unless ``override=True``.
    """
    return objectives.register(name, factory, override=override, **defaults)


def unregister(name: str) -> None:
    """Remove a registered objective (mainly for tests)."""
    objectives.unregister(name)


def get(name: str, **overrides):
    """Build the objective registered as ``name``; ``overrides`` replace its config defaults (validated)."""
    key, cls, params = objectives.entry(name)
    return cls(name=key, **{**params, **overrides})


def get_class(name: str) -> type:
    """The class registered as ``name`` (without building it)."""
    return objectives.get(name)


def defaults(name: str) -> dict[str, Any]:
    """The registered default overrides of ``name`` (on top of its class's Config defaults)."""
    return objectives.entry(name)[2]


def available(pattern: str = "*") -> list[str]:
    """Sorted registered objective names matching a shell-style wildcard, e.g. ``available("minirl*")``."""
    return objectives.available(pattern)
