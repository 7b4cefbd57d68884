"""The objective registry: one dict, a decorator, ``get`` and ``available`` (timm-style).

    @pgzoo.register("my-loss")
    class MyLoss(pgzoo.Objective): ...

    pgzoo.register("minirl-no-clip", MiniRL, clip=False)   # a variant = a class plus default overrides

    pgzoo.get("minirl", eps_high=0.3)       # -> configured instance
    pgzoo.available("minirl*")              # -> sorted names

Names are lower-case with hyphens; underscores are accepted and mean the same. Third-party packages register
through the ``pgzoo.objectives`` entry-point group: each entry point names an Objective subclass (registered under
the entry point's name) or a callable that registers its objectives when called.
"""

from __future__ import annotations

import fnmatch
import importlib
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

from pgzoo.errors import ConfigError, UnknownNameError

ENTRY_POINT_GROUP = "pgzoo.objectives"


@dataclass(frozen=True)
class _Entry:
    name: str
    factory: Any  # an Objective subclass
    defaults: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, _Entry] = {}
_builtins_loaded = False
_plugins_loaded = False


def canonical(name: str) -> str:
    """Normalise a user-given name: lower case, underscores as hyphens, surrounding space dropped."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"objective name must be a non-empty string, got {name!r}")
    return name.strip().lower().replace("_", "-")


def register(name: str | type | None = None, factory: type | None = None, *, override: bool = False, **defaults):
    """Register an objective class under ``name``, optionally with default config overrides.

    Use as a decorator (``@register("name")`` or bare ``@register``, which takes the class's ``name`` attribute)
    or as a call (``register("name", Class, **defaults)``). A duplicate name raises unless ``override=True``.
    """
    if isinstance(name, type):  # bare @register
        return register(None, name, override=override, **defaults)

    def _add(cls: type) -> type:
        key = canonical(name if name is not None else getattr(cls, "name", None) or cls.__name__)
        if key in _REGISTRY and not override:
            raise ConfigError(
                f"objective {key!r} is already registered (by {_REGISTRY[key].factory.__qualname__}); "
                "pass override=True to replace it"
            )
        if defaults and hasattr(cls, "Config"):
            cls.validate_overrides(defaults)
        _REGISTRY[key] = _Entry(key, cls, dict(defaults))
        return cls

    if factory is not None:
        return _add(factory)
    return _add


def unregister(name: str) -> None:
    """Remove a registered objective (mainly for tests)."""
    _REGISTRY.pop(canonical(name), None)


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        importlib.import_module("pgzoo.objectives")


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as exc:  # a broken plugin must not break pgzoo; say which one
            raise ConfigError(f"entry point {ep.name!r} in group {ENTRY_POINT_GROUP!r} failed to load: {exc}") from exc
        key = canonical(ep.name)
        if isinstance(obj, type):
            if key not in _REGISTRY:
                register(key, obj)
        elif callable(obj):
            obj()


def _lookup(name: str) -> _Entry:
    _load_builtins()
    key = canonical(name)
    if key not in _REGISTRY:
        _load_plugins()
    if key not in _REGISTRY:
        raise UnknownNameError("objective", key, _REGISTRY)
    return _REGISTRY[key]


def get(name: str, **overrides):
    """Build the objective registered as ``name``; ``overrides`` replace its config defaults (validated)."""
    entry = _lookup(name)
    params = {**entry.defaults, **overrides}
    return entry.factory(name=entry.name, **params)


def get_class(name: str) -> type:
    """The class registered as ``name`` (without building it)."""
    return _lookup(name).factory


def defaults(name: str) -> dict[str, Any]:
    """The registered default overrides of ``name`` (on top of its class's Config defaults)."""
    return dict(_lookup(name).defaults)


def available(pattern: str = "*") -> list[str]:
    """Sorted registered names matching a shell-style wildcard, e.g. ``available("minirl*")``."""
    _load_builtins()
    _load_plugins()
    pattern = pattern.lower().replace("_", "-")
    return sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern))
