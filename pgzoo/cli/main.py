"""The ``pgzoo`` command.

    pgzoo train RECIPE [key=value ...]     run a recipe (the GRPO-style Lightning loop)
    pgzoo recipe validate RECIPE ...       check recipes and print the resolved plan
    pgzoo recipe list | cp NAME FILE       the recipes shipped with pgzoo; copy one to edit
    pgzoo cold-start [options]             supervised cold start of the embedded tiny policy
    pgzoo eval CHECKPOINT --task NAME      greedy accuracy and avg@k / pass@k
    pgzoo compare --grid GRID --seeds 0 1 2   run a grid (resumable), then a figure and table over seeds
    pgzoo objectives [PATTERN] [--json]    list the registered objectives with every default

Each subcommand is a module of this package (``pgzoo.cli.train``, ...) exposing ``add_arguments(parser)`` and
``run(args) -> int``; this file only dispatches, importing the chosen command's module alone. User mistakes (any
:class:`pgzoo.PgzooError`) print one clear line and exit with status 2 instead of a traceback (a run stopped by
SIGINT / SIGTERM: 130 / 143); ``PGZOO_TRACEBACK=1`` shows the traceback too.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from pgzoo.errors import PgzooError

DESCRIPTION = "pgzoo: policy-gradient objectives for LLM RL: train, evaluate and compare runs."

# subcommand -> (module, help). The module provides add_arguments(parser) and run(args).
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("pgzoo.cli.train", "run a recipe: rollouts, rewards, advantages, objective updates"),
    "recipe": ("pgzoo.cli.recipe", "list, copy and validate recipes"),
    "cold-start": ("pgzoo.cli.cold_start", "supervised cold start of the embedded tiny policy"),
    "eval": ("pgzoo.cli.eval", "evaluate a checkpoint on a task (greedy accuracy, avg@k, pass@k)"),
    "compare": ("pgzoo.cli.compare", "run a grid of recipes x seeds (resumable) and compare runs over seeds"),
    "objectives": ("pgzoo.cli.objectives", "list the registered objectives with their defaults"),
}


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser | None]:
    """The top-level parser, and the parser of the command named in ``argv`` (None when there is none)."""
    parser = argparse.ArgumentParser(prog="pgzoo", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = next((a for a in argv if not a.startswith("-")), None)
    chosen = None
    for name, (module, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text)
        sp.set_defaults(_module=module, command=name)
        if name == wanted:  # import only the module of the command being run (keeps `pgzoo -h` fast)
            importlib.import_module(module).add_arguments(sp)
            chosen = sp
    return parser, chosen


def parse(argv: list[str]) -> argparse.Namespace:
    """Parse a command line; a command's flags and positionals (``key=value`` overrides) may come in any order:
    ``pgzoo train RECIPE --dry-run train.steps=3`` is ``pgzoo train RECIPE train.steps=3 --dry-run``."""
    parser, chosen = build_parser(argv)
    if chosen is None or chosen._subparsers is not None or argv[0] != chosen.prog.split()[-1]:
        return parser.parse_args(argv)  # no command yet, top-level flags first, or nested actions (`pgzoo recipe`)
    return chosen.parse_intermixed_args(argv[1:])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse(argv)
        return int(importlib.import_module(args._module).run(args) or 0)
    except PgzooError as exc:
        if os.environ.get("PGZOO_TRACEBACK"):
            raise
        rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))
        what = getattr(exc, "prefix", "error")  # an interrupted run "stopped", with its own exit status
        if not getattr(exc, "quiet", False):  # a stopped rank other than 0: rank 0 said it
            print(f"pgzoo: {what}{'' if rank in ('', '0') else f' (rank {rank})'}: {exc}", file=sys.stderr)
        return int(getattr(exc, "exit_code", 2))
    except KeyboardInterrupt:
        print("pgzoo: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `pgzoo recipe list | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes stdout
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
