"""``pgzoo eval CHECKPOINT [--task NAME] [--k 8 --temperature 1.0 --n 200]``: greedy accuracy, avg@k and pass@k of a
checkpoint, or of a run folder's newest intact checkpoint (:mod:`pgzoo.models.evaluate` defines the metrics)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from pgzoo.cli.options import parse_key_value
from pgzoo.errors import ConfigError, require
from pgzoo.models.evaluate import evaluate, heldout_problems, resolve_checkpoint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="Hugging Face checkpoint folder (e.g. from `pgzoo cold-start`), or a "
                                           "`pgzoo train` run folder (its newest intact checkpoint)")
    parser.add_argument("--task", default=None, help="task name (default: the task in the checkpoint's card.json)")
    parser.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                        help="task option (repeatable); default: the options in card.json when --task matches")
    parser.add_argument("--split", default="test", choices=["train", "test"])
    parser.add_argument("--n", type=int, default=200, help="number of problems")
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--n-samples", type=int, default=None, help="samples per problem (default k)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the tiny model gains nothing from more, and on a busy "
                             "machine extra threads spin-wait); 0 keeps torch's default")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")


def run(args: argparse.Namespace) -> int:
    import pgzoo.tasks
    from pgzoo.models.tiny import load_pretrained, read_card

    if args.threads < 0:
        raise ConfigError(f"--threads {args.threads}: use a positive count, or 0 for torch's default")
    if args.threads:
        require("torch", "hf").set_num_threads(args.threads)
    args.checkpoint = str(resolve_checkpoint(args.checkpoint))
    model, tokenizer = load_pretrained(args.checkpoint)
    card = read_card(args.checkpoint) or {}
    name = args.task or card.get("task")
    if not name:
        raise ConfigError(f"{args.checkpoint} has no card.json naming its task; pass --task NAME "
                          f"(one of {', '.join(pgzoo.tasks.available())})")
    options = dict(card.get("task_options", {})) if name == card.get("task") else {}
    options.update(dict(parse_key_value(o) for o in args.task_option))
    task = pgzoo.tasks.get(name, **options)
    if args.n < 1:
        raise ConfigError(f"--n {args.n}: evaluate at least one problem")
    t0 = time.perf_counter()
    problems = heldout_problems(task, args.n, split=args.split, seed=args.seed,
                                say=lambda msg: print(msg, file=sys.stderr))
    metrics = evaluate(model, tokenizer, task, problems, k=args.k,
                       temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                       n_samples=args.n_samples, seed=args.seed)
    metrics["seconds"] = round(time.perf_counter() - t0, 3)
    if args.json:
        print(json.dumps(metrics, sort_keys=True))
    else:
        print(f"{args.checkpoint}: task {name} {task.options}, {args.split} split")
        for key, value in metrics.items():
            print(f"  {key:24s} {value:.4f}" if isinstance(value, float) else f"  {key:24s} {value}")
    return 0
