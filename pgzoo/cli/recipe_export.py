"""``pgzoo recipe export --to verl RECIPE [key=value ...]``: the verl overrides for a recipe's objective, advantage,
rollout and routing-replay settings, one per line (paste them after ``python -m verl.trainer.main_ppo``), then, as
comments, the recipe settings with no verl equivalent here (docs/verl.md).
"""

from __future__ import annotations

import argparse

from pgzoo.adapters.verl.names import recipe_overrides
from pgzoo.recipes import load_recipe

TARGETS = ("verl",)


def add_arguments(sub) -> None:
    ex = sub.add_parser("export", help="print another trainer's settings for a recipe (verl overrides)")
    ex.add_argument("--to", dest="target", choices=TARGETS, required=True, help="the trainer: verl")
    ex.add_argument("recipe", nargs="+", help="a recipe file or shipped recipe name (key=value overrides may follow)")


def run(args: argparse.Namespace) -> int:
    files = [a for a in args.recipe if "=" not in a]
    overrides = [a for a in args.recipe if "=" in a]
    if len(files) != 1:
        raise SystemExit("pgzoo recipe export: give exactly one recipe (key=value overrides may follow)")
    recipe = load_recipe(files[0], overrides)
    lines, rest = recipe_overrides(recipe)
    print(f"# verl 0.9.1 overrides for {files[0]} (pgzoo's plugin: docs/verl.md)")
    for line in lines:
        print(line)
    for item in rest:
        print(f"# not exported: {item}")
    return 0


__all__ = ["add_arguments", "run", "TARGETS"]
