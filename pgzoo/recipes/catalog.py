"""The recipes shipped with pgzoo: the repository's ``recipes/`` folder, installed as the package
``pgzoo.recipe_files`` so that ``pgzoo train tiny/minirl`` works from any folder, with a wheel install too.

A recipe argument that is not a file names one (``tiny/minirl``, ``recipes/tiny/minirl.yaml``; :func:`find_recipe`);
:func:`list_recipes` is ``pgzoo recipe list`` and :func:`copy_recipe` is ``pgzoo recipe cp NAME FILE`` (a copy to edit).
"""

from __future__ import annotations

import os
from pathlib import Path

from pgzoo.errors import ConfigError, suggest
from pgzoo.recipes.strict_yaml import load_yaml


def shipped_recipe_dir() -> Path | None:
    """The folder of the recipes pgzoo ships: the repository's ``recipes/``, installed as ``pgzoo.recipe_files``
    (so ``pgzoo train tiny/minirl`` works from any folder, with a wheel install too)."""
    from importlib import resources

    try:
        folder = Path(str(resources.files("pgzoo.recipe_files")))
    except (ModuleNotFoundError, TypeError):  # an install made before the recipes were packaged
        folder = Path(__file__).resolve().parent.parent / "recipes"
    return folder if (folder / "tiny").is_dir() else None


def shipped_recipes() -> dict[str, Path]:
    """Shipped recipes by name (``tiny/minirl``, ``paper/offpolicy-n4-minirl-r2``, ...), sorted."""
    folder = shipped_recipe_dir()
    if folder is None:
        return {}
    # grid*.yaml files are grids (pgzoo.lab.grid), not recipes
    found = {f"{p.parent.name}/{p.stem}": p for p in folder.glob("*/*.yaml") if not p.stem.startswith("grid")}
    return dict(sorted(found.items()))


def find_recipe(name: str | os.PathLike) -> Path:
    """Resolve a recipe argument: an existing YAML file, else a shipped recipe (:func:`shipped_recipe`).

    A local file of the same path always wins, so ``recipes/tiny/minirl.yaml`` is the checkout's file inside a
    checkout and the installed copy anywhere else.
    """
    path = Path(name)
    if path.is_file():
        return path
    if path.is_dir():
        raise ConfigError(f"recipe {str(name)!r} is a folder; give one YAML file in it, e.g. "
                          f"{next(iter(sorted(path.glob('*.yaml'))), path / 'minirl.yaml')}")
    return shipped_recipe(name, missing="not found: no such file, and no shipped recipe of that name")


def shipped_recipe(name: str | os.PathLike, *, missing: str = "no shipped recipe of that name") -> Path:
    """The shipped recipe ``name``: ``tiny/minirl``, ``tiny/minirl.yaml`` or ``recipes/tiny/minirl.yaml`` (the paths
    the docs and the recipe headers use), or a bare file name that only one grid has (``cold-start-minirl-r2``)."""
    shipped = shipped_recipes()
    key = Path(name).as_posix()
    for prefix in ("./", "recipes/"):
        key = key[len(prefix):] if key.startswith(prefix) else key
    for ext in (".yaml", ".yml"):
        key = key[: -len(ext)] if key.endswith(ext) else key
    if key in shipped:
        return shipped[key]
    matches = [k for k in shipped if k.split("/", 1)[1] == key] if "/" not in key else []
    if len(matches) == 1:
        return shipped[matches[0]]
    if matches:
        raise ConfigError(f"recipe {str(name)!r} is ambiguous: {' or '.join(matches)}? Name the grid "
                          "(`pgzoo recipe list` shows every shipped recipe)")
    raise ConfigError(f"recipe {str(name)!r}: {missing}.{suggest(key, shipped)} `pgzoo recipe list` shows the "
                      "shipped recipes; `pgzoo recipe cp NAME FILE` copies one to edit")


def list_recipes(pattern: str = "*") -> list[tuple[str, str]]:
    """(name, description) of the shipped recipes matching the wildcard ``pattern``."""
    import fnmatch

    out = []
    for name, path in shipped_recipes().items():
        if fnmatch.fnmatch(name, pattern):
            data = load_yaml(path.read_text(), str(path)) or {}
            out.append((name, str(data.get("description", "")) if isinstance(data, dict) else ""))
    return out


def copy_recipe(name: str, dest: str | os.PathLike, *, force: bool = False) -> Path:
    """Copy the shipped recipe ``name`` to ``dest`` (a file, or an existing folder); never overwrites unless
    ``force``. Returns the written path."""
    import shutil

    src = shipped_recipe(name)
    target = Path(dest)
    if target.is_dir():
        target = target / src.name
    if target.exists() and not force:
        raise ConfigError(f"{target} exists; pass --force to overwrite it, or choose another file")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, target)
    return target


__all__ = ["shipped_recipe_dir", "shipped_recipes", "find_recipe", "shipped_recipe", "list_recipes", "copy_recipe"]
