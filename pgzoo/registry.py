"""One small generic registry (timm-style); each kind of pluggable thing has an instance in the package that owns it.

    @pgzoo.register("my-loss")
    class MyLoss(pgzoo.Objective): ...

    pgzoo.register("minirl-no-clip", MiniRL, clip=False)   # a variant = a class plus default overrides

    pgzoo.get("minirl", eps_high=0.3)       # -> configured instance
    pgzoo.available("minirl*")              # -> sorted names

Every kind of pluggable thing is a :class:`Registry` with the same rules:

- ``register`` works as a decorator (``@reg.register("name")``, or bare ``@reg.register``, which takes the object's
  ``name`` attribute or its ``__name__``) and as a call (``reg.register("name", obj, **defaults)``); a duplicate
  name raises unless ``override=True``;
- names are lower-case with hyphens; underscores and surrounding space are accepted and mean the same;
- an unknown name raises :class:`~pgzoo.errors.UnknownNameError` with the nearest names;
- ``available("minirl*")`` filters with shell-style wildcards;
- third-party packages plug in through an entry-point group per registry. An entry point names either a module
  (importing it runs its ``register`` lines), an object the registry accepts (registered under the entry point's
  name), or a function that registers when called (for registries of functions: one taking no arguments).

The instances (where it lives, entry-point group, what is registered):

- ``pgzoo.objectives.registry.objectives``  ``pgzoo.objectives``: an :class:`~pgzoo.Objective` subclass
  (``pgzoo.get`` / ``pgzoo.register`` / ``pgzoo.available``);
- ``pgzoo.advantages.registry``  ``pgzoo.advantages``: ``fn(rewards, index, num_groups, **options)``;
- ``pgzoo.tasks.base.registry``  ``pgzoo.tasks``: a :class:`~pgzoo.tasks.Task` subclass (``pgzoo.tasks.get``);
- ``pgzoo.rollout.builders.engines``  ``pgzoo.engines``: ``build(rollout, model_path, *, seed, return_routes,
  world_size) -> engine`` (a recipe's ``rollout.engine``).

This module imports nothing of pgzoo but its errors: every package that owns a registry imports it, never the
other way round.
"""

from __future__ import annotations

import fnmatch
import importlib
import inspect
from collections.abc import Callable
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any

from pgzoo.errors import ConfigError, UnknownNameError


def canonical(name: str, kind: str = "objective") -> str:
    """Normalise a user-given name: lower case, underscores as hyphens, surrounding space dropped."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{kind} name must be a non-empty string, got {name!r}")
    return name.strip().lower().replace("_", "-")


class Registry:
    """Name -> object, with per-name default keyword arguments, wildcards, suggestions and entry-point plugins.

    Args:
        kind: what the entries are, in messages ("objective", "task", ...).
        group: the entry-point group third-party packages register through.
        builtins: module imported on first lookup, whose import registers the built-in entries (lazy, so that
            ``import pgzoo`` stays cheap and free of cycles).
        accepts: predicate on an object: whether it can be registered here (a type check; ``None``: callables).
        describe: how to say what ``accepts`` wants, in messages.
        check_defaults: ``fn(obj, defaults)`` raising ConfigError when registered defaults are invalid.
    """

    def __init__(self, kind: str, group: str, *, builtins: str | None = None,
                 accepts: Callable[[Any], bool] | None = None, describe: str = "a callable",
                 check_defaults: Callable[[Any, dict], None] | None = None):
        self.kind, self.group, self.builtins = kind, group, builtins
        self.accepts = accepts or callable
        self.describe = describe
        self.check_defaults = check_defaults
        self.entries: dict[str, Any] = {}  # canonical name -> registered object
        self.defaults: dict[str, dict[str, Any]] = {}  # canonical name -> default keyword arguments
        self._builtins_loaded = builtins is None
        self._plugins_loaded = False

    def canonical(self, name: str) -> str:
        return canonical(name, self.kind)

    # ------------------------------------------------------------------ registration
    def register(self, name: Any = None, obj: Any = None, *, override: bool = False, **defaults):
        """Register ``obj`` under ``name`` (with default keyword arguments); usable as a decorator or a call."""
        if name is not None and not isinstance(name, str):  # bare @register on the object itself
            return self.register(None, name, override=override, **defaults)

        def _add(target: Any) -> Any:
            if not self.accepts(target):
                raise ConfigError(f"cannot register {target!r} as a {self.kind}: expected {self.describe}")
            key = self.canonical(name if name is not None else
                                 getattr(target, "name", None) or getattr(target, "__name__", ""))
            if key in self.entries and not override:
                raise ConfigError(f"{self.kind} {key!r} is already registered (by {_label(self.entries[key])}); "
                                  "pass override=True to replace it")
            if defaults and self.check_defaults is not None:
                self.check_defaults(target, defaults)
            self.entries[key] = target
            self.defaults[key] = dict(defaults)
            return target

        return _add if obj is None else _add(obj)

    def unregister(self, name: str) -> None:
        """Remove an entry (mainly for tests); an absent name is not an error."""
        key = self.canonical(name)
        self.entries.pop(key, None)
        self.defaults.pop(key, None)

    # ------------------------------------------------------------------ lookup
    def _load_builtins(self) -> None:
        if not self._builtins_loaded:
            self._builtins_loaded = True
            importlib.import_module(self.builtins)

    def load_plugins(self, *, reload: bool = False) -> None:
        """Load this registry's entry points (once; ``reload=True`` looks again, e.g. after installing one)."""
        if self._plugins_loaded and not reload:
            return
        self._plugins_loaded = True
        for ep in entry_points(group=self.group):
            try:
                obj = ep.load()
            except Exception as exc:  # a broken plugin must not pass silently; say which one
                raise ConfigError(f"entry point {ep.name!r} in group {self.group!r} failed to load: {exc}") from exc
            if isinstance(obj, ModuleType):
                continue  # importing the module ran its register lines
            key = self.canonical(ep.name)
            if self.accepts(obj) and (isinstance(obj, type) or not _takes_no_arguments(obj)):
                if key not in self.entries:
                    self.register(key, obj)
            elif callable(obj):
                obj()
            else:
                raise ConfigError(f"entry point {ep.name!r} in group {self.group!r} names {obj!r}, which is neither "
                                  f"{self.describe}, a module, nor a function that registers")

    def _key(self, name: str) -> str:
        self._load_builtins()
        key = self.canonical(name)
        if key not in self.entries:
            self.load_plugins()
        if key not in self.entries:
            raise UnknownNameError(self.kind, key, self.entries)
        return key

    def get(self, name: str) -> Any:
        """The object registered as ``name`` (a class or function, not built)."""
        return self.entries[self._key(name)]

    def entry(self, name: str) -> tuple[str, Any, dict[str, Any]]:
        """``(canonical name, object, default keyword arguments)`` of ``name``."""
        key = self._key(name)
        return key, self.entries[key], dict(self.defaults.get(key, {}))

    def build(self, name: str, *args, **kwargs) -> Any:
        """Call the registered object with its defaults updated by ``kwargs``."""
        _, obj, defaults = self.entry(name)
        return obj(*args, **{**defaults, **kwargs})

    def __contains__(self, name: object) -> bool:
        try:
            self._key(name)  # type: ignore[arg-type]
        except (UnknownNameError, ConfigError):
            return False
        return True

    def available(self, pattern: str = "*") -> list[str]:
        """Sorted registered names matching a shell-style wildcard, e.g. ``available("minirl*")``."""
        self._load_builtins()
        self.load_plugins()
        if not isinstance(pattern, str):
            raise ConfigError(f"available(pattern): expected a wildcard string such as 'minirl*', got {pattern!r}")
        pattern = pattern.strip().lower().replace("_", "-")
        return sorted(n for n in self.entries if fnmatch.fnmatchcase(n, pattern))

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, group={self.group!r}, {len(self.entries)} entries)"


def _label(obj: Any) -> str:
    return getattr(obj, "__qualname__", None) or repr(obj)


def _takes_no_arguments(obj: Any) -> bool:
    """Whether ``obj`` can be called without arguments: in a registry of functions such an entry point is a
    registrar to call, not an entry (no estimator or builder takes no arguments)."""
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return False
    return not any(p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                   for p in params)
