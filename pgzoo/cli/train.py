"""``pgzoo train RECIPE [key=value ...]``: run a recipe with pgzoo's Lightning trainer
(:func:`pgzoo.adapters.lightning.run.train`; its runbook is there).

    pgzoo train recipes/tiny/minirl.yaml                       # the embedded default (vLLM CPU rollouts)
    pgzoo train recipes/tiny/minirl.yaml train.steps=5 output.dir=runs/quick
    pgzoo train recipes/tiny/minirl.yaml --dry-run             # print the resolved plan, run nothing
    pgzoo train recipes/tiny/minirl.yaml --resume              # continue the run in output.dir exactly
    pgzoo train tiny/minirl train.strategy=fsdp train.devices=2        # two ranks, Lightning starts them
    torchrun --nproc-per-node 2 -m pgzoo train tiny/minirl train.strategy=fsdp train.devices=2

Nothing heavy is imported before the command runs: ``pgzoo train --help`` costs the import of torch.
"""

from __future__ import annotations

import argparse

from pgzoo.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML, or a shipped recipe's name, e.g. recipes/tiny/minirl.yaml "
                        "or tiny/minirl (see `pgzoo recipe list`)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=3e-4")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved plan and exit")
    parser.add_argument("--resume", action="store_true", help="continue the run in output.dir from its newest "
                                                               "checkpoint (exactly: same metrics as uninterrupted)")
    parser.add_argument("--allow-change", action="append", default=[], metavar="KEY",
                        help="with --resume: let the recipe differ from the checkpoint's in KEY (repeatable; keys "
                             "that do not change what a step computes, e.g. train.steps to extend the run)")
    parser.add_argument("--print-recipe", action="store_true", help="also print the resolved YAML")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary table")


def run(args: argparse.Namespace) -> int:
    from pgzoo.recipes import load_recipe

    recipe = load_recipe(args.recipe, args.overrides).check_environment()
    if args.dry_run or args.print_recipe:
        print(recipe.plan())
        if args.print_recipe:
            print(recipe.dump())
        if args.dry_run:
            return 0
    command = " ".join(["pgzoo train", args.recipe, *args.overrides])
    if args.allow_change and not args.resume:
        raise ConfigError("--allow-change only applies with --resume (a new run takes any recipe)")
    from pgzoo.adapters.lightning.run import train

    train(recipe, resume=args.resume, quiet=args.quiet, command=command, allow_change=args.allow_change)
    return 0
