"""``scratchpad``: multi-digit addition worked column by column with written carries; the answer on the final line.

    task = pgzoo.tasks.get("scratchpad", operands=2, min_digits=4, max_digits=4)   # the defaults
    p = task.problem([4738, 2956])           # Problem("4738+2956=", "7694")
    print(task.solution(p))
    # 8+6+0=14
    # 3+5+1=09
    # 7+9+0=16
    # 4+2+1=07
    # 7694

Why: the paper's mechanisms (token-level vs sequence-level objectives, a training–inference gap that compounds over
a sequence) only show with long responses. One column per line, right to left: the column's digits (0 where an
operand is shorter), the incoming carry, ``=`` and the column sum written with two digits (``09``); its last digit
is the answer digit and its first the next carry. The final line is the answer. Every line has the same length, so
with fixed-width operands (``min_digits == max_digits``, the default) each digit the model copies or combines sits
at a fixed distance from where it is written — what lets a 4-layer model learn the format in a couple of minutes.
With the embedded character tokenizer a solution is ``2·operands + 5`` tokens per column plus the answer and EOS:
41–42 tokens for two 4-digit operands, 61–62 for two 6-digit ones, 85–86 for three 7-digit ones
(``task.solution_tokens``).

Difficulty: ``operands`` addends (2–4) of ``min_digits``..``max_digits`` digits each (1–9), drawn uniformly
by digit count first, then uniformly among the numbers of that length (so short and long problems are equally
frequent). Splits: by a stable hash of the prompt (``test_fraction`` in ``test``), as ``arithmetic``.

Verifier (final-line parsing): the completion's last non-blank line, stripped of spaces, must be an integer written
with digits only (an optional leading ``+``/``-`` and ``=`` are accepted) equal in value to the answer. Anything
else — an empty completion, a final line with other text, a missing final line, a number too long to be an
answer — is wrong (reward 0); the verifier never raises. The scratchpad lines themselves are not checked: only the
final answer counts, as in the paper's math tasks.
"""

from __future__ import annotations

import random
import re

from pgzoo.errors import ConfigError
from pgzoo.tasks.base import Problem, Task, check_count, check_split, register, split_of

_FINAL = re.compile(r"=?[+-]?[0-9]{1,40}")


def final_line_integer(completion: str) -> int | None:
    """The integer on the last non-blank line of ``completion`` (see the module docstring), or None."""
    if not isinstance(completion, str):
        return None
    lines = [line.replace(" ", "") for line in completion.splitlines()]
    lines = [line for line in lines if line]
    if not lines or not _FINAL.fullmatch(lines[-1]):
        return None
    return int(lines[-1].lstrip("="))


def column_lines(operands: list[int]) -> tuple[list[str], int]:
    """The worked lines of column addition (right to left, one per column) and the total."""
    width = max(len(str(x)) for x in operands)
    digits = [str(x).rjust(width, "0") for x in operands]
    lines, carry = [], 0
    for col in range(width - 1, -1, -1):
        ds = [int(d[col]) for d in digits]
        s = sum(ds) + carry
        lines.append("+".join(map(str, ds)) + f"+{carry}={s:02d}")
        carry = s // 10
    return lines, sum(operands)


@register("scratchpad")
class ScratchpadAdditionTask(Task):
    """Multi-digit addition with a worked scratchpad (see the module docstring)."""

    name = "scratchpad"

    def __init__(self, operands: int = 2, min_digits: int = 4, max_digits: int = 4,
                 test_fraction: float = 0.1) -> None:
        super().__init__()
        for key, value, low, high in (("operands", operands, 2, 4), ("min_digits", min_digits, 1, 9),
                                      ("max_digits", max_digits, 1, 9)):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(f"scratchpad: {key}={value!r}; use an integer from {low} to {high}")
        if max_digits < min_digits:
            raise ConfigError(f"scratchpad: max_digits={max_digits} < min_digits={min_digits}; "
                              "set max_digits >= min_digits")
        if isinstance(test_fraction, bool) or not (isinstance(test_fraction, (int, float))
                                                   and 0.0 < test_fraction < 1.0):
            raise ConfigError(f"scratchpad: test_fraction={test_fraction!r}; use a number strictly between 0 and 1")
        self.operands, self.min_digits, self.max_digits = operands, min_digits, max_digits
        self.test_fraction = float(test_fraction)
        self.options = dict(operands=operands, min_digits=min_digits, max_digits=max_digits,
                            test_fraction=self.test_fraction)

    @property
    def solution_tokens(self) -> tuple[int, int]:
        """(shortest, longest) worked solution in tokens of the embedded character tokenizer, EOS included."""
        low = 0 if self.min_digits == 1 else 10 ** (self.min_digits - 1)
        short = self.solution(self.problem([low] * self.operands))
        long = self.solution(self.problem([10**self.max_digits - 1] * self.operands))
        return len(short) + 1, len(long) + 1

    # -- problems ----------------------------------------------------------------------------------------------
    def problem(self, operands: list[int] | tuple[int, ...]) -> Problem:
        """The :class:`Problem` for given addends (``[4738, 2956]`` -> ``"4738+2956="``, answer ``"7694"``)."""
        return Problem(prompt="+".join(map(str, operands)) + "=", answer=str(sum(operands)))

    def solution(self, problem: Problem) -> str:
        """The worked solution the cold start teaches: column lines, then the answer on the final line."""
        operands = [int(x) for x in problem.prompt.rstrip("=").split("+")]
        lines, total = column_lines(operands)
        return "\n".join([*lines, str(total)])

    def demonstration(self, problem: Problem) -> str:
        return self.solution(problem)

    def _number(self, rng: random.Random) -> int:
        d = rng.randint(self.min_digits, self.max_digits)
        return rng.randint(0 if d == 1 else 10 ** (d - 1), 10**d - 1)

    def sample(self, n: int, split: str = "train", seed: int = 0) -> list[Problem]:
        check_count(n), check_split(split)
        rng = random.Random(f"pgzoo-scratchpad-{split}-{seed}")
        space = (10**self.max_digits) ** self.operands
        out: list[Problem] = []
        seen: set[str] = set()
        tries = 0
        while len(out) < n:  # rejection sampling by split; repeats allowed only once the space is exhausted
            tries += 1
            p = self.problem([self._number(rng) for _ in range(self.operands)])
            if split_of(p.prompt, self.test_fraction) != split:
                continue
            if p.prompt in seen and tries < 20 * space:
                continue
            seen.add(p.prompt)
            out.append(p)
        return out

    # -- verification --------------------------------------------------------------------------------------------
    def verify(self, completion: str, answer: str) -> bool:
        got = final_line_integer(completion)
        try:
            want = int(str(answer).strip())
        except ValueError:
            return False
        return got is not None and got == want
