"""The ``pgzoo`` command.

    pgzoo train RECIPE [key=value ...]     run a recipe (the GRPO-style Lightning loop)
    pgzoo recipe validate RECIPE ...       check recipes and print the resolved plan
    pgzoo recipe list | cp NAME FILE       the recipes shipped with pgzoo; copy one to edit
    pgzoo cold-start [options]             supervised cold start of the embedded tiny policy
    pgzoo eval CHECKPOINT --task NAME      greedy accuracy and avg@k / pass@k
    pgzoo compare --grid GRID --seeds 0 1 2   run a grid (resumable), then a figure and table over seeds
    pgzoo objectives                       list the registered objectives

Each subcommand lives in the module that owns its feature and exposes ``add_arguments(parser)`` and
``run(args) -> int``; this file only dispatches. User mistakes (any :class:`pgzoo.PgzooError`) print one clear
line and exit with status 2 instead of a traceback; ``PGZOO_TRACEBACK=1`` shows the traceback too.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from pgzoo.errors import PgzooError

# subcommand -> (module, help). The module provides add_arguments(parser) and run(args).
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("pgzoo.train", "run a recipe: rollouts, rewards, advantages, objective updates"),
    "recipe": ("pgzoo.recipes", "list, copy and validate recipes"),
    "cold-start": ("pgzoo.models.cold_start", "supervised cold start of the embedded tiny policy"),
    "eval": ("pgzoo.evaluate", "evaluate a checkpoint on a task (greedy accuracy, avg@k, pass@k)"),
    "compare": ("pgzoo.compare", "run a grid of recipes x seeds (resumable) and compare runs over seeds"),
    "objectives": ("pgzoo.cli", "list the registered objectives with their defaults"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pattern", nargs="?", default="*", help="wildcard filter, e.g. 'minirl*'")


def run(args: argparse.Namespace) -> int:
    import pgzoo

    for name in pgzoo.available(args.pattern):
        obj = pgzoo.get(name)
        print(f"{name:22s} advantage={obj.default_advantage:16s} {obj.config}")
    return 0


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pgzoo", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text)
        sp.set_defaults(_module=module)
        if name == wanted:  # import only the module of the command being run (keeps `pgzoo -h` fast)
            importlib.import_module(module).add_arguments(sp)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser(argv)
        args = parser.parse_args(argv)
        return int(importlib.import_module(args._module).run(args) or 0)
    except PgzooError as exc:
        if os.environ.get("PGZOO_TRACEBACK"):
            raise
        print(f"pgzoo: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pgzoo: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `pgzoo recipe list | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes stdout
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
