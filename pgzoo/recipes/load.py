"""Loading a recipe: a YAML file (or a shipped recipe's name) plus ``dotted.key=value`` overrides, validated into a
:class:`~pgzoo.recipes.schema.Recipe`; type errors name the dotted key, unknown keys the nearest valid one.

    recipe = load_recipe("recipes/tiny/minirl.yaml", ["train.lr=3e-4", "rollout.group_size=8"])
"""

from __future__ import annotations

import os
from typing import Any

from pgzoo.errors import ConfigError, suggest
from pgzoo.recipes.catalog import find_recipe
from pgzoo.recipes.schema import Recipe, pydantic
from pgzoo.recipes.strict_yaml import load_yaml

ValidationError = pydantic.ValidationError


def _section_fields(path: tuple) -> list[str]:
    """Valid keys at a dotted location of the schema (for 'did you mean')."""
    cls: Any = Recipe
    for part in path:
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return []
        cls = field.annotation
    return list(getattr(cls, "model_fields", {}))


def _format_errors(exc: ValidationError, source: str) -> ConfigError:
    lines = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        key = ".".join(loc)
        if err["type"] == "extra_forbidden":
            valid = _section_fields(loc[:-1])
            prefix = ".".join(loc[:-1]) + "." if loc[:-1] else ""
            hint = suggest(loc[-1], valid)
            if hint:
                hint = suggest(key, [prefix + v for v in valid])
            lines.append(f"unknown key {key!r}.{hint} Valid keys{' under ' + '.'.join(loc[:-1]) if loc[:-1] else ''}:"
                         f" {', '.join(valid)}")
        else:
            got = err.get("input")
            lines.append(f"{key}: {err['msg']} (got {got!r})")
    return ConfigError(f"{source}: " + "; ".join(lines))


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """``["train.lr=3e-4", "rollout.engine=vllm"]`` -> nested dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value; write e.g. train.lr=3e-4")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r} has an empty key part; write e.g. train.lr=3e-4")
        value = load_yaml(raw, f"override {item!r}") if raw.strip() else None
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {p!r}")
        node[parts[-1]] = value
    return out


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("options", "cold_start", "files"):
            out[k] = _merge(out[k], v)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def recipe_from_dict(data: dict, overrides: list[str] | dict | None = None, *, source: str = "recipe",
                     check: bool = True) -> Recipe:
    """Build and check a :class:`Recipe` from a dict plus overrides."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a recipe must be a YAML mapping of sections, got {type(data).__name__}")
    extra = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    merged = _merge(data, extra)
    try:
        recipe = Recipe.model_validate(merged)
    except ValidationError as exc:
        raise _format_errors(exc, source) from None
    return recipe.check() if check else recipe


def load_recipe(path: str | os.PathLike, overrides: list[str] | dict | None = None, *, check: bool = True) -> Recipe:
    """Load a recipe YAML (a file, or a shipped recipe's name: see :func:`find_recipe`), apply ``key=value``
    overrides, validate types and combinations."""
    path = find_recipe(path)
    data = load_yaml(path.read_text(), str(path))
    if data is None:
        raise ConfigError(f"{path}: the recipe file is empty; start from a shipped one with "
                          f"`pgzoo recipe cp tiny/minirl {path}`")
    if isinstance(data, dict):
        data.setdefault("name", path.stem)
    return recipe_from_dict(data, overrides, source=str(path), check=check)


__all__ = ["load_recipe", "recipe_from_dict", "parse_overrides"]
