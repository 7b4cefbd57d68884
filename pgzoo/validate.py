"""Strict value checks shared by objectives, advantage estimators and tasks: a string is not a bool, a bool is not
a number, and a range is checked where the value is given.

    check_bool("MiniRL: clip", value)                         # only True / False
    check_number("GRPO: beta", value, low=0.0)                # int or float (not bool, not str), finite, >= 0
    check_number("MiniRL: is_cap", value, low=0.0, low_open=True)
    check_number("CISPO: eps_low", value, low=0.0, optional=True)   # None allowed
    check_int("pass-at-k: k", value, low=1)
    check_choice("GRPO: aggregation", value, ("token-mean", ...))

Each raises :class:`~pgzoo.errors.ConfigError` naming the key (pass it as "Owner: key") and what it accepts, and
returns the value (ints given for a float stay ints; compare, do not rely on the type).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

from pgzoo.errors import ConfigError


def _range_text(low, high, low_open, high_open) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high:g}")
    return " and ".join(parts)


def check_bool(key: str, value: Any) -> bool:
    """``value`` must be ``True`` or ``False`` (not ``"false"``, not 0/1)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} must be true or false (a boolean, not {type(value).__name__})")
    return value


def check_number(key: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, optional: bool = False,
                 finite: bool = True, hint: str = "") -> Any:
    """``value`` must be a real number (int or float; numpy scalars too; not bool, not str) in the given range.

    ``low_open``/``high_open`` make a bound strict; ``optional=True`` lets ``None`` through; ``finite=False``
    admits ±inf (NaN never passes). ``hint`` is appended to the message (e.g. the paper's value).
    """
    if value is None and optional:
        return value
    rng = _range_text(low, high, low_open, high_open)
    what = "a number" + (f" {rng}" if rng else "") + (" or null (none)" if optional else "")
    tail = f" ({hint})" if hint else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{key}={value!r} must be {what}, not {type(value).__name__}{tail}")
    x = float(value)
    if math.isnan(x):
        raise ConfigError(f"{key}={value!r} must be {what}, not NaN{tail}")
    if finite and math.isinf(x):
        raise ConfigError(f"{key}={value!r} must be {what}, finite{tail}")
    if low is not None and (x <= low if low_open else x < low):
        raise ConfigError(f"{key}={value!r} must be {what}{tail}")
    if high is not None and (x >= high if high_open else x > high):
        raise ConfigError(f"{key}={value!r} must be {what}{tail}")
    return value


def check_int(key: str, value: Any, *, low: int | None = None, high: int | None = None,
              optional: bool = False, hint: str = "") -> Any:
    """``value`` must be an integer (not bool, not a float such as 2.0) in [low, high]."""
    if value is None and optional:
        return value
    rng = _range_text(low, high, False, False)
    what = "an integer" + (f" {rng}" if rng else "") + (" or null" if optional else "")
    tail = f" ({hint})" if hint else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{key}={value!r} must be {what}, not {type(value).__name__}{tail}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ConfigError(f"{key}={value!r} must be {what}{tail}")
    return int(value)


def check_choice(key: str, value: Any, choices: Iterable[str]) -> str:
    """``value`` must be one of ``choices`` (strings, compared exactly)."""
    choices = list(choices)
    if not isinstance(value, str) or value not in choices:
        from pgzoo.errors import suggest

        hint = suggest(value, choices) if isinstance(value, str) else ""
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(choices)}.{hint}")
    return value
