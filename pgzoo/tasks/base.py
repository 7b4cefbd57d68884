"""The task interface: problems with reference answers, a verifier and a binary reward; plus the task registry.

    task = pgzoo.tasks.get("arithmetic", max_digits=2)
    problems = task.sample(64, split="train", seed=0)      # list[Problem(prompt="12+7=", answer="19")]
    r = task.reward("19", problems[0])                     # 1.0 if verify(completion, answer) else 0.0

A task splits its problems into disjoint ``train`` and ``test`` sets deterministically (by a hash of the problem), so
held-out evaluation never sees a training prompt, whatever seeds the caller uses. ``sample`` is reproducible: the same
``(n, split, seed)`` gives the same list.

Third-party tasks subclass :class:`Task` and register with ``@pgzoo.tasks.register("name")``.
"""

from __future__ import annotations

import fnmatch
import hashlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pgzoo.errors import ConfigError, UnknownNameError

SPLITS = ("train", "test")


@dataclass(frozen=True)
class Problem:
    """One prompt with its reference answer; ``meta`` carries task-specific extras (e.g. the source line)."""

    prompt: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


def split_of(key: str, test_fraction: float, salt: str = "") -> str:
    """Assign ``key`` to ``"train"`` or ``"test"`` by a stable hash (independent of Python's hash seed).

    The bucket is the first 8 bytes of sha256(salt + key) as a fraction in [0, 1); ``"test"`` when below
    ``test_fraction``. The same key always lands in the same split, so the splits are disjoint by construction.
    """
    h = int.from_bytes(hashlib.sha256((salt + key).encode("utf-8")).digest()[:8], "big")
    return "test" if h / 2.0**64 < test_fraction else "train"


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ConfigError(f"split={split!r} is not a split; use one of {', '.join(SPLITS)}")
    return split


def check_count(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError(f"n={n!r}: the number of problems to sample must be a non-negative integer")
    return n


class Task:
    """Base class of verifiable-reward tasks.

    Subclasses set ``name``, store their validated options in ``self.options`` (a plain dict, JSON-serialisable:
    it keys the cold-start cache) and implement :meth:`sample` and :meth:`verify`. :meth:`reward` is the binary
    reward 1.0 / 0.0 of :meth:`verify`; override it for shaped rewards.
    """

    name: ClassVar[str] = "task"

    def __init__(self) -> None:
        self.options: dict[str, Any] = {}

    def sample(self, n: int, split: str = "train", seed: int = 0) -> list[Problem]:
        """``n`` problems from ``split`` ("train" or "test"), reproducible for ``seed``."""
        raise NotImplementedError

    def verify(self, completion: str, answer: str) -> bool:
        """Whether ``completion`` (the model's generated text after the prompt) states ``answer``."""
        raise NotImplementedError

    def demonstration(self, problem: Problem) -> str:
        """The completion the cold start trains on (default: the bare answer; tasks with a worked format override)."""
        return problem.answer

    def reward(self, completion: str, problem: Problem) -> float:
        """Binary verifiable reward: 1.0 when :meth:`verify` accepts the completion, else 0.0."""
        return 1.0 if self.verify(completion, problem.answer) else 0.0

    def rewards(self, completions: list[str], problems: list[Problem]) -> list[float]:
        """:meth:`reward` over aligned lists."""
        if len(completions) != len(problems):
            raise ConfigError(
                f"rewards: got {len(completions)} completions for {len(problems)} problems; pass one problem per "
                "completion (repeat each problem once per sample)"
            )
        return [self.reward(c, p) for c, p in zip(completions, problems)]

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this task's problems, for caches: the options, plus data hashes where data is read."""
        return dict(self.options)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}({opts})"


# ----------------------------------------------------------------------------------------------------------------
# registry (one dict and a decorator, like pgzoo's objective registry)

_TASKS: dict[str, type[Task]] = {}


def canonical(name: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"task name must be a non-empty string, got {name!r}")
    return name.strip().lower().replace("_", "-")


def register(name: str | type | None = None, *, override: bool = False):
    """Register a :class:`Task` subclass under ``name`` (decorator). A duplicate name raises unless ``override``."""
    if isinstance(name, type):
        return register(None, override=override)(name)

    def _add(cls: type[Task]) -> type[Task]:
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise ConfigError(f"register: {cls!r} is not a pgzoo.tasks.Task subclass")
        key = canonical(name if name is not None else cls.name)
        if key in _TASKS and _TASKS[key] is not cls and not override:
            raise ConfigError(f"task {key!r} is already registered (by {_TASKS[key].__qualname__}); "
                              "pass override=True to replace it")
        _TASKS[key] = cls
        return cls

    return _add


def unregister(name: str) -> None:
    """Remove a registered task (mainly for tests)."""
    _TASKS.pop(canonical(name), None)


def get(name: str, **options: Any) -> Task:
    """Build the task registered as ``name`` with ``options`` (validated by the task; unknown keys raise)."""
    key = canonical(name)
    if key not in _TASKS:
        raise UnknownNameError("task", key, _TASKS)
    cls = _TASKS[key]
    try:
        return cls(**options)
    except TypeError as exc:  # unknown keyword: list the valid ones
        import inspect

        valid = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        raise ConfigError(f"task {key!r}: {exc}. Valid options: {', '.join(valid)}") from exc


def available(pattern: str = "*") -> list[str]:
    """Sorted registered task names matching a shell-style wildcard."""
    pattern = pattern.lower().replace("_", "-")
    return sorted(n for n in _TASKS if fnmatch.fnmatchcase(n, pattern))
