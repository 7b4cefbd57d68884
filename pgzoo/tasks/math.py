"""``math``: a user's JSONL file of problems and reference answers, verified with math-verify when installed.

    task = pgzoo.tasks.get("math", path="problems.jsonl", problem_field="question", answer_field="answer")
    task.sample(8, split="train", seed=0)

Each line is a JSON object holding at least ``problem_field`` and ``answer_field`` (blank lines are skipped). A line
that does not parse, is not an object, or lacks a field raises :class:`pgzoo.ConfigError` naming the file and the
line number. The prompt is ``template`` with ``{problem}`` replaced by the problem (default
``"{problem}\\nAnswer: "``; other braces, e.g. LaTeX, are kept as written).

Splits: by a stable hash of the problem text (``test_fraction`` of them in ``test``), or, with ``split_field``, by
that field's value (``"train"`` / ``"test"``).

Verifier: math-verify (``pip install 'pgzoo[math]'``) parses the reference and the completion (LaTeX or plain
expressions; the last answer-like expression in the completion counts) and compares them symbolically, so
``"The answer is 0.5"`` matches ``\\frac{1}{2}``. Without math-verify, a normalised exact match: the content of the
last ``\\boxed{...}``, else the text after the last "answer is"/"answer:", else the last number (or the whole
completion); ``$``, spaces and a trailing period are dropped; numbers are compared by value.
"""

from __future__ import annotations

import json
import random
import re
import threading
from fractions import Fraction
from pathlib import Path

from pgzoo.errors import ConfigError
from pgzoo.tasks.base import SPLITS, Problem, Task, check_count, check_split, register, split_of

_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:/\d+)?")


def _boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (balanced braces), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def _as_number(text: str) -> Fraction | None:
    try:
        return Fraction(text.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def normalise(text: str, *, extract: bool = True) -> str:
    """Normalised answer text used by the fallback verifier (see module docstring)."""
    text = (text or "").strip()
    if extract:
        boxed = _boxed(text)
        if boxed is not None:
            text = boxed
        else:
            m = list(re.finditer(r"answer\s*(?:is|:)\s*", text, flags=re.IGNORECASE))
            if m:
                text = text[m[-1].end():]
            else:
                nums = _NUMBER.findall(text)
                if nums and _as_number(text.replace(" ", "")) is None:
                    text = nums[-1]
    text = text.replace("$", "").replace(" ", "").strip().rstrip(".").lower()
    return text


def normalised_match(completion: str, answer: str) -> bool:
    """Fallback verifier: normalised exact match, numbers by value."""
    got, want = normalise(completion), normalise(answer, extract=False)
    if not got:
        return False
    if got == want:
        return True
    a, b = _as_number(got), _as_number(want)
    return a is not None and b is not None and a == b


def math_verify_match(completion: str, answer: str) -> bool:
    """math-verify's symbolic comparison (signal-based timeouts only on the main thread)."""
    from math_verify import parse, verify

    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold = parse(answer, parsing_timeout=timeout) or parse(f"${answer}$", parsing_timeout=timeout)
    pred = parse(completion or "", parsing_timeout=timeout)
    if not gold or not pred:
        return False
    return bool(verify(gold, pred, timeout_seconds=timeout))


def _text(value, key: str, lineno: int, path: Path) -> str:
    """A problem or answer field as text: strings, and numbers written as text; null, booleans, lists, objects
    and blank strings are errors naming the line."""
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    what = "null" if value is None else "blank" if isinstance(value, str) else f"a {type(value).__name__}"
    raise ConfigError(f"math: line {lineno} of {path}: {key!r} is {what} ({json.dumps(value)}); give every problem "
                      f"its {key} as text or a number (fix {path}:{lineno})")


@register("math")
class MathTask(Task):
    """Problems and answers from a JSONL file (see module docstring)."""

    name = "math"

    def __init__(
        self,
        path: str | Path | None = None,
        problem_field: str = "problem",
        answer_field: str = "answer",
        template: str = "{problem}\nAnswer: ",
        test_fraction: float = 0.1,
        split_field: str | None = None,
        verifier: str = "auto",
    ) -> None:
        super().__init__()
        if path is None:
            raise ConfigError("math: path is required; pass path='problems.jsonl' (one JSON object per line)")
        if "{problem}" not in template:
            raise ConfigError(f"math: template={template!r} must contain '{{problem}}'")
        if split_field is None and not (isinstance(test_fraction, (int, float)) and 0.0 < test_fraction < 1.0):
            raise ConfigError(f"math: test_fraction={test_fraction!r}; use a number strictly between 0 and 1")
        if verifier not in ("auto", "math-verify", "exact"):
            raise ConfigError(f"math: verifier={verifier!r}; use 'auto', 'math-verify' or 'exact'")
        if verifier != "exact":
            try:
                import math_verify  # noqa: F401

                verifier = "math-verify"
            except ImportError:
                if verifier == "math-verify":
                    raise ConfigError("math: verifier='math-verify' needs math-verify; "
                                      "pip install 'pgzoo[math]' or use verifier='exact'") from None
                verifier = "exact"
        self.path = Path(path)
        self.problem_field, self.answer_field, self.template = problem_field, answer_field, template
        self.test_fraction, self.split_field, self.verifier = float(test_fraction), split_field, verifier
        self.splits: dict[str, list[Problem]] = self._load()
        self.options = dict(path=str(self.path.resolve()), problem_field=problem_field, answer_field=answer_field,
                            template=template, test_fraction=float(test_fraction), split_field=split_field,
                            verifier=verifier)

    def _load(self) -> dict[str, list[Problem]]:
        if not self.path.is_file():
            raise ConfigError(f"math: path={str(self.path)!r} is not a file; give a JSONL file of problems")
        splits: dict[str, list[Problem]] = {s: [] for s in SPLITS}
        with self.path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                where = f"{self.path}:{lineno}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"math: line {lineno} of {self.path} is not valid JSON ({exc.msg}); "
                                      f"fix {where}") from None
                if not isinstance(row, dict):
                    raise ConfigError(f"math: line {lineno} of {self.path} is not a JSON object; fix {where}")
                for key in (self.problem_field, self.answer_field):
                    if key not in row:
                        raise ConfigError(f"math: line {lineno} of {self.path} has no field {key!r} (fields: "
                                          f"{', '.join(row)}); fix the line or set problem_field/answer_field")
                problem, answer = (_text(row[key], key, lineno, self.path)
                                   for key in (self.problem_field, self.answer_field))
                if self.split_field is not None:
                    split = row.get(self.split_field)
                    if split not in SPLITS:
                        raise ConfigError(f"math: line {lineno} of {self.path}: {self.split_field}={split!r}; "
                                          "use 'train' or 'test'")
                else:
                    split = split_of(problem, self.test_fraction)
                prompt = self.template.replace("{problem}", problem)  # not str.format: templates may hold braces
                splits[split].append(Problem(prompt=prompt, answer=answer, meta={"line": lineno}))
        if not any(splits.values()):
            raise ConfigError(f"math: {self.path} holds no problems")
        return splits

    def all_problems(self) -> list[Problem]:
        """Every problem of the file (train, then test)."""
        return [p for split in SPLITS for p in self.splits[split]]

    def fingerprint(self) -> dict:
        """Options plus the sha256 of the file, so an edited file never reuses a stale cold start."""
        import hashlib

        return {**self.options, "sha256": hashlib.sha256(self.path.read_bytes()).hexdigest()}

    def split_size(self, split: str) -> int:
        """Number of problems in ``split``."""
        check_split(split)
        return len(self.splits[split])

    def sample(self, n: int, split: str = "train", seed: int = 0) -> list[Problem]:
        check_count(n), check_split(split)
        pool = self.splits[split]
        if not pool and n:
            raise ConfigError(f"math: the {split} split of {self.path} is empty; add problems or change "
                              "test_fraction / split_field")
        rng = random.Random(f"pgzoo-math-{split}-{seed}")
        return rng.sample(pool, n) if n <= len(pool) else [rng.choice(pool) for _ in range(n)]

    def verify(self, completion: str, answer: str) -> bool:
        if not (completion or "").strip():
            return False
        if self.verifier == "math-verify":
            return math_verify_match(completion, answer)
        return normalised_match(completion, answer)
