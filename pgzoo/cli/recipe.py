"""``pgzoo recipe validate | list | cp | export``: check recipe files and print their plan, list the shipped recipes,
copy one to edit, print a recipe's settings for another trainer (``export --to verl``).

``pgzoo recipe validate RECIPE...`` checks files without loading any model (paths need not exist: file checks run
when training starts, or here with ``--check-files``); ``pgzoo train RECIPE --dry-run`` prints the same plan.
"""

from __future__ import annotations

import argparse

from pgzoo.cli import recipe_export
from pgzoo.errors import ConfigError
from pgzoo.recipes.catalog import copy_recipe, list_recipes
from pgzoo.recipes import load_recipe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="recipe_command", metavar="ACTION", required=True)
    v = sub.add_parser("validate", help="check recipe files and print the resolved plan")
    v.add_argument("recipes", nargs="+", help="recipe YAML files or shipped recipe names (key=value overrides "
                                              "may follow)")
    v.add_argument("--check-files", action="store_true", help="also require model/eval/task paths to exist")
    v.add_argument("--print", dest="print_yaml", action="store_true", help="print the fully resolved YAML")
    ls = sub.add_parser("list", help="list the recipes shipped with pgzoo")
    ls.add_argument("pattern", nargs="?", default="*", help="wildcard filter, e.g. 'tiny/offpolicy-*'")
    cp = sub.add_parser("cp", help="copy a shipped recipe to a file, to edit")
    cp.add_argument("name", help="shipped recipe, e.g. tiny/minirl")
    cp.add_argument("dest", help="destination file (or folder)")
    cp.add_argument("--force", action="store_true", help="overwrite an existing file")
    recipe_export.add_arguments(sub)


def run(args: argparse.Namespace) -> int:
    if args.recipe_command == "export":
        return recipe_export.run(args)
    if args.recipe_command == "list":
        rows = list_recipes(args.pattern)
        if not rows:
            raise ConfigError(f"no shipped recipe matches {args.pattern!r}; `pgzoo recipe list` shows them all")
        width = max(len(n) for n, _ in rows)
        for name, description in rows:
            print(f"{name:{width}s}  {description}")
        return 0
    if args.recipe_command == "cp":
        target = copy_recipe(args.name, args.dest, force=args.force)
        print(f"copied {args.name} to {target}; run it with: pgzoo train {target}")
        return 0
    files = [a for a in args.recipes if "=" not in a]
    overrides = [a for a in args.recipes if "=" in a]
    if not files:
        raise ConfigError("pgzoo recipe validate: give at least one recipe file")
    for f in files:
        recipe = load_recipe(f, overrides)
        if args.check_files:
            recipe.check_files()
        print(f"ok  {f}")
        print("    " + recipe.plan().replace("\n", "\n    "))
        if args.print_yaml:
            print(recipe.dump())
    return 0


__all__ = ["add_arguments", "run"]
