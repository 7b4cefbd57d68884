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

import functools
import hashlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pgzoo.errors import ConfigError
from pgzoo.registry import Registry

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


def _checked_sample(sample):
    @functools.wraps(sample)
    def checked(self, n, split="train", seed=0):
        out = sample(self, n, split, seed)
        out = list(out) if out is not None and not isinstance(out, list) else out
        name = getattr(self, "name", type(self).__name__)
        if out is None or len(out) != n:
            got = "None" if out is None else f"{len(out)} problems"
            raise ConfigError(f"task {name!r}: sample(n={n}, split={split!r}, seed={seed}) returned {got}; a task "
                              f"must return exactly n problems (repeat problems when its {split} pool is smaller)")
        bad = next((p for p in out if not isinstance(p, Problem)), None)
        if bad is not None:
            raise ConfigError(f"task {name!r}: sample() returned a {type(bad).__name__} ({bad!r}); return "
                              "pgzoo.tasks.Problem(prompt=..., answer=...) objects")
        return out

    return checked


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

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "sample" in cls.__dict__:  # every task's sample() returns exactly n Problems, or raises
            cls.sample = _checked_sample(cls.__dict__["sample"])

    def sample(self, n: int, split: str = "train", seed: int = 0) -> list[Problem]:
        """``n`` problems from ``split`` ("train" or "test"), reproducible for ``seed``.

        Exactly ``n``: a task whose pool is smaller repeats problems (fewer would silently shrink the batch, and
        is an error)."""
        raise NotImplementedError

    def all_problems(self) -> list[Problem] | None:
        """Every problem of both splits when the task holds a fixed list (a data file), else None (generated
        problems). Used to check a whole data set up front, e.g. its characters against a tokenizer."""
        return None

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
# the task registry (entry-point group ``pgzoo.tasks``)

def _is_task(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, Task)


registry = Registry("task", "pgzoo.tasks", builtins="pgzoo.tasks", accepts=_is_task,
                    describe="a pgzoo.tasks.Task subclass")
_TASKS = registry.entries  # name -> Task subclass (the registry's own dict)


def canonical(name: str) -> str:
    return registry.canonical(name)


def register(name: str | type | None = None, *, override: bool = False):
    """Register a :class:`Task` subclass under ``name`` (decorator). A duplicate name raises unless ``override``."""
    if isinstance(name, type):
        return registry.register(None, name, override=override)
    return registry.register(name, override=override)


def unregister(name: str) -> None:
    """Remove a registered task (mainly for tests)."""
    registry.unregister(name)


def get(name: str, **options: Any) -> Task:
    """Build the task registered as ``name`` with ``options`` (validated by the task; unknown keys raise)."""
    key, cls, defaults = registry.entry(name)
    import inspect

    params = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    valid = [p for p in params if p != "self" and params[p].kind is not params[p].VAR_KEYWORD]
    unknown = sorted(set(options) - set(valid))
    if unknown and not takes_any:
        raise ConfigError(f"task {key!r} has no option(s) {', '.join(map(repr, unknown))}. "
                          f"Valid options: {', '.join(valid) or '(none)'}")
    return cls(**{**defaults, **options})


def available(pattern: str = "*") -> list[str]:
    """Sorted registered task names matching a shell-style wildcard."""
    return registry.available(pattern)
