"""``pgzoo cold-start [--task NAME] [--seed S]``: the supervised cold start of the embedded tiny policy, cached
(:func:`pgzoo.models.cold_start.ensure_cold_start`); prints the checkpoint folder and its card."""

from __future__ import annotations

import argparse

from pgzoo.cli.options import parse_key_value
from pgzoo.models.cold_start import ensure_cold_start


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", default="arithmetic")
    parser.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                        help="task option, repeatable (e.g. --task-option max_digits=2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=None, help="default: $PGZOO_CACHE or ~/.cache/pgzoo")
    parser.add_argument("--sft-option", action="append", default=[], metavar="KEY=VALUE",
                        help="SFT option, repeatable (e.g. --sft-option lr=0.002); see SFTConfig")
    parser.add_argument("--force", action="store_true", help="retrain even when the cache holds the checkpoint")
    parser.add_argument("--quiet", action="store_true")


def run(args: argparse.Namespace) -> int:
    from pgzoo.models.tiny import read_card

    task_options = dict(parse_key_value(o) for o in args.task_option)
    sft_options = dict(parse_key_value(o, "--sft-option") for o in args.sft_option)
    log = None if args.quiet else (lambda msg: print(msg, flush=True))
    path = ensure_cold_start(args.task, task_options, seed=args.seed, cache_dir=args.cache_dir, force=args.force,
                             log=log, **sft_options)
    card = read_card(path) or {}
    print(path)
    if not args.quiet:
        print(f"  steps {card.get('steps')}  seconds {card.get('seconds')}  held-out sampled (T=1) accuracy "
              f"{card.get('test_sampled_accuracy')}  greedy {card.get('test_greedy_accuracy')}  "
              f"in band {card.get('in_band')}")
    return 0


