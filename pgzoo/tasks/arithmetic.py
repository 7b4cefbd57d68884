"""``arithmetic``: integer expressions such as ``"12+7="`` -> ``"19"``, with tunable difficulty.

    task = pgzoo.tasks.get("arithmetic", operands=2, min_digits=1, max_digits=2, operators="+-")
    task.sample(3, split="test", seed=0)   # [Problem("40+7=", "47"), ...]

Problem space: ``operands`` integers drawn uniformly from those with ``min_digits``..``max_digits`` decimal digits
(0 counts as a 1-digit number), joined by operators drawn uniformly from ``operators`` (a subset of ``+-*``).
The answer is the exact integer value with the usual precedence (``*`` before ``+``/``-``, left to right), written
in decimal with a leading ``-`` when negative. Prompts and answers use only digits, ``+-*=`` and ``-``, which the
embedded character tokenizer covers.

Splits: a problem is in ``test`` when sha256 of its prompt falls below ``test_fraction`` (default 0.1), else in
``train``: disjoint, stable across machines and Python versions. Small spaces (up to 200 000 problems) are
enumerated, so ``sample`` returns distinct problems while the split has enough of them; larger spaces are sampled
by rejection.

Verifier: the first integer in the completion (optional sign, then digits) compared by value with the answer, so
``" 19"``, ``"019"``, ``"19 is the answer"`` and ``"The answer is 19."`` are right, ``""``, ``"1 9"`` and ``"18"``
are wrong. Reward: 1.0 when right, else 0.0.
"""

from __future__ import annotations

import random
import re

from pgzoo.errors import ConfigError
from pgzoo.tasks.base import Problem, Task, check_count, check_split, register, split_of

OPERATORS = "+-*"
ENUMERATE_LIMIT = 200_000
_INT = re.compile(r"[-+]?\d+")


def evaluate_expression(operands: list[int], operators: list[str]) -> int:
    """Value of ``o0 op0 o1 op1 ...`` with ``*`` binding tighter than ``+``/``-`` (left to right)."""
    total, term = 0, operands[0]
    sign = 1
    for op, x in zip(operators, operands[1:]):
        if op == "*":
            term *= x
        else:
            total += sign * term
            sign, term = (1 if op == "+" else -1), x
    return total + sign * term


def first_integer(text: str) -> int | None:
    """The first integer written in ``text`` (optional sign), or None."""
    m = _INT.search(text or "")
    return int(m.group()) if m else None


@register("arithmetic")
class ArithmeticTask(Task):
    """Integer arithmetic with configurable operand count, digit range and operators (see module docstring)."""

    name = "arithmetic"

    def __init__(
        self,
        operands: int = 2,
        min_digits: int = 1,
        max_digits: int = 2,
        operators: str = "+",
        test_fraction: float = 0.1,
    ) -> None:
        super().__init__()
        for key, value, low in (("operands", operands, 2), ("min_digits", min_digits, 1),
                                ("max_digits", max_digits, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"arithmetic: {key}={value!r} is impossible; use an integer >= {low}")
        if max_digits < min_digits:
            raise ConfigError(f"arithmetic: max_digits={max_digits} < min_digits={min_digits}; "
                              "set max_digits >= min_digits")
        if max_digits > 9 or operands > 8:
            raise ConfigError(f"arithmetic: operands={operands}, max_digits={max_digits} exceed the tiny model's "
                              "prompt budget; use operands <= 8 and max_digits <= 9")
        if isinstance(operators, (list, tuple)):
            operators = "".join(operators)
        if not isinstance(operators, str) or not operators:
            raise ConfigError(f"arithmetic: operators={operators!r}; give a non-empty subset of {OPERATORS!r}")
        bad = sorted(set(operators) - set(OPERATORS))
        if bad:
            raise ConfigError(f"arithmetic: unknown operator(s) {''.join(bad)!r} in operators={operators!r}; "
                              f"use a subset of {OPERATORS!r}")
        operators = "".join(dict.fromkeys(operators))  # dedupe, keep order
        if not (isinstance(test_fraction, (int, float)) and 0.0 < test_fraction < 1.0):
            raise ConfigError(f"arithmetic: test_fraction={test_fraction!r}; use a number strictly between 0 and 1")
        self.operands, self.min_digits, self.max_digits = operands, min_digits, max_digits
        self.operators, self.test_fraction = operators, float(test_fraction)
        self.options = dict(operands=operands, min_digits=min_digits, max_digits=max_digits, operators=operators,
                            test_fraction=float(test_fraction))
        self._low = 0 if min_digits == 1 else 10 ** (min_digits - 1)
        self._high = 10**max_digits - 1
        n_numbers = self._high - self._low + 1
        self.space_size = n_numbers**operands * len(operators) ** (operands - 1)
        self._splits: dict[str, list[tuple[tuple[int, ...], tuple[str, ...]]]] | None = None

    # -- problems ----------------------------------------------------------------------------------------------
    def problem(self, operands: list[int] | tuple[int, ...], operators: list[str] | tuple[str, ...]) -> Problem:
        """The :class:`Problem` for given operands and operators (e.g. ``([12, 7], ["+"])`` -> ``"12+7="``)."""
        prompt = "".join(f"{x}{op}" for x, op in zip(operands, (*operators, "=")))
        return Problem(prompt=prompt, answer=str(evaluate_expression(list(operands), list(operators))))

    def _enumerated(self) -> dict[str, list]:
        if self._splits is None:
            import itertools

            splits: dict[str, list] = {"train": [], "test": []}
            nums = range(self._low, self._high + 1)
            for xs in itertools.product(nums, repeat=self.operands):
                for ops in itertools.product(self.operators, repeat=self.operands - 1):
                    prompt = "".join(f"{x}{op}" for x, op in zip(xs, (*ops, "=")))
                    splits[split_of(prompt, self.test_fraction)].append((xs, ops))
            for name, items in splits.items():
                if not items:
                    raise ConfigError(f"arithmetic: the {name} split is empty ({self.space_size} problems in all); "
                                      "widen the digit range or change test_fraction")
            self._splits = splits
        return self._splits

    def split_size(self, split: str) -> int | None:
        """Number of distinct problems in ``split`` (None when the space is too large to enumerate)."""
        check_split(split)
        return len(self._enumerated()[split]) if self.space_size <= ENUMERATE_LIMIT else None

    def sample(self, n: int, split: str = "train", seed: int = 0) -> list[Problem]:
        check_count(n), check_split(split)
        rng = random.Random(f"pgzoo-arithmetic-{split}-{seed}")
        if self.space_size <= ENUMERATE_LIMIT:
            pool = self._enumerated()[split]
            picks = rng.sample(pool, n) if n <= len(pool) else [rng.choice(pool) for _ in range(n)]
            return [self.problem(xs, ops) for xs, ops in picks]
        out: list[Problem] = []
        seen: set[str] = set()
        while len(out) < n:  # rejection sampling; the space is large, so repeats and wrong splits are rare
            xs = [rng.randint(self._low, self._high) for _ in range(self.operands)]
            ops = [rng.choice(self.operators) for _ in range(self.operands - 1)]
            p = self.problem(xs, ops)
            if p.prompt in seen or split_of(p.prompt, self.test_fraction) != split:
                continue
            seen.add(p.prompt)
            out.append(p)
        return out

    # -- verification --------------------------------------------------------------------------------------------
    def verify(self, completion: str, answer: str) -> bool:
        got, want = first_integer(completion), first_integer(str(answer))
        return got is not None and want is not None and got == want
