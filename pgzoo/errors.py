"""pgzoo's error types.

Every error a user can cause derives from :class:`PgzooError`, names the offending field or setting, and says how to
fix it. Subclasses also derive from the matching builtin (ValueError, LookupError, ...) so generic handlers work.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class PgzooError(Exception):
    """Base class of every error pgzoo raises on purpose."""


class BatchError(PgzooError, ValueError):
    """A :class:`pgzoo.TokenBatch` field is malformed or missing.

    ``field`` names the offending field; the message says how to fix it.
    """

    def __init__(self, field: str, problem: str, fix: str):
        self.field = field
        self.problem = problem
        self.fix = fix
        super().__init__(f"TokenBatch.{field}: {problem}. Fix: {fix}")


class ConfigError(PgzooError, ValueError):
    """A configuration value (objective override, recipe key, engine setting) is invalid."""


class UnknownNameError(PgzooError, LookupError):
    """A name (objective, task, advantage estimator, ...) is not registered."""

    def __init__(self, kind: str, name: str, known: Iterable[str]):
        known = sorted(known)
        self.kind, self.name, self.known = kind, name, known
        super().__init__(f"unknown {kind} {name!r}.{suggest(name, known)} Available: {', '.join(known)}")

    def __str__(self) -> str:  # LookupError would otherwise repr() the message
        return self.args[0]


class DependencyError(PgzooError, ImportError):
    """An optional dependency is missing; the message names the extra to install."""


class EngineError(PgzooError, RuntimeError):
    """A rollout engine failed or was given input it cannot serve."""


class RoutingError(PgzooError, RuntimeError):
    """Routing record/replay could not be applied, or did not take effect."""


def suggest(name: str, known: Iterable[str]) -> str:
    """Return a ' Did you mean ...?' hint for ``name`` among ``known`` (empty when nothing is close)."""
    close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.4)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def require(module: str, extra: str):
    """Import ``module`` or raise a :class:`DependencyError` naming the pip extra that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - exercised where the extra is absent
        raise DependencyError(
            f"{module} is not installed (or failed to import: {exc}). "
            f"Install it with: pip install 'pgzoo[{extra}]'"
        ) from exc
