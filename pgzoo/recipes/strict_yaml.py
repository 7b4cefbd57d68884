"""Reading recipe YAML strictly: numbers are numbers, a key given twice is an error.

PyYAML's safe loader follows YAML 1.1, where ``3e-4`` (no dot) is the *string* "3e-4": a strict schema would then
reject the learning rate every RL recipe writes that way, and a lax one would accept any string that looks like a
number. :func:`load_yaml` resolves floats as YAML 1.2 does (``3e-4``, ``1e5``, ``.5``, ``-2.5E+3``, ``.inf``) and
refuses duplicate keys, which PyYAML silently resolves to the last value (``lr`` set twice in a recipe is a mistake
the user must see).
"""

from __future__ import annotations

import re
from typing import Any

from pgzoo.errors import ConfigError, require

_FLOAT_12 = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                           |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                           |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                           |[-+]?\.(?:inf|Inf|INF)
                           |\.(?:nan|NaN|NAN))$""", re.X)

_loader_cls = None


def _loader():
    """A SafeLoader subclass with YAML 1.2 floats and a duplicate-key check (built once, on first use)."""
    global _loader_cls
    if _loader_cls is not None:
        return _loader_cls
    yaml = require("yaml", "lightning")

    class StrictLoader(yaml.SafeLoader):
        pass

    # Replace the float resolver (keyed by first character) with the YAML 1.2 pattern.
    StrictLoader.yaml_implicit_resolvers = {
        ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:float"]
        for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789."))

    def construct_mapping(loader, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"key {key!r} is given twice (lines {seen[key]} and {line}); keep one")
            seen[key] = line
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    _loader_cls = StrictLoader
    return StrictLoader


def load_yaml(text: str, source: str = "recipe") -> Any:
    """Parse ``text`` with YAML 1.2 floats, refusing duplicate keys; errors name ``source``."""
    yaml = require("yaml", "lightning")
    try:
        return yaml.load(text, Loader=_loader())  # noqa: S506 - a SafeLoader subclass
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML ({exc})") from None
