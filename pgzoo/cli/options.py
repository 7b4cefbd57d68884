"""``KEY=VALUE`` command-line options (``--task-option``, ``--sft-option``): the value is read as JSON when it
parses (numbers, booleans, lists), else kept as a string."""

from __future__ import annotations

import json
from typing import Any

from pgzoo.errors import ConfigError


def parse_key_value(text: str, flag: str = "--task-option") -> tuple[str, Any]:
    """``"max_digits=2"`` -> ``("max_digits", 2)``; a text without ``=`` raises naming ``flag``."""
    if "=" not in text:
        raise ConfigError(f"{flag} {text!r}: use key=value, e.g. {flag} max_digits=2")
    key, value = text.split("=", 1)
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value
