"""``pgzoo objectives [PATTERN] [--json]``: the registered objectives with every default, and the advantage
estimators with their options."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pattern", nargs="?", default="*", help="wildcard filter, e.g. 'minirl*'")
    parser.add_argument("--json", action="store_true", help="print one JSON object per objective")


def describe_objective(name: str) -> dict:
    """What ``pgzoo objectives`` prints for ``name``: class, paper, required fields, advantage, every default."""
    import dataclasses

    import pgzoo

    obj = pgzoo.get(name)
    return {
        "name": name,
        "class": type(obj).__name__,
        "paper": obj.paper,
        "requires": sorted(obj.requires),
        "advantage": obj.default_advantage,
        "defaults": {f.name: getattr(obj.config, f.name) for f in dataclasses.fields(obj.config)},
    }


def describe_estimators() -> dict[str, dict]:
    """Each advantage estimator's options with their defaults (its per-token inputs and ``lengths`` left out: they
    are data, not options)."""
    import inspect

    from pgzoo.advantages import registry as advantages

    out = {}
    for name in advantages.available():
        fn = advantages.get(name)
        data = {"lengths", *getattr(fn, "token_inputs", ())}
        params = list(inspect.signature(fn).parameters.values())[3:]
        out[name] = {p.name: p.default for p in params
                     if p.default is not inspect.Parameter.empty and p.name not in data}
    return out


def describe_token_inputs() -> dict[str, tuple[str, ...]]:
    """The per-token ``[N, T]`` inputs of each estimator that reads any (it may give an advantage per token)."""
    from pgzoo import advantages

    return {name: advantages.token_inputs(name) for name in advantages.available() if advantages.token_inputs(name)}


def run(args: argparse.Namespace) -> int:
    import json

    import pgzoo

    names = pgzoo.available(args.pattern)
    if not names:
        from pgzoo.errors import ConfigError, suggest

        raise ConfigError(f"no objective matches {args.pattern!r}.{suggest(args.pattern, pgzoo.available())} "
                          f"Available: {', '.join(pgzoo.available())}")
    for name in names:
        d = describe_objective(name)
        if args.json:
            print(json.dumps(d, default=repr))
            continue
        print(f"{name}  ({d['class']}; {d['paper'] or 'no paper given'})")
        print(f"    advantage: {d['advantage']}    also requires: {', '.join(d['requires']) or '-'}")
        print("    " + " ".join(f"{k}={v!r}" for k, v in d["defaults"].items()))
    if not args.json and args.pattern == "*":
        print("\nadvantage estimators (objective.advantage; pgzoo.advantages.compute):")
        per_token = describe_token_inputs()
        for name, options in describe_estimators().items():
            print(f"    {name}" + (f"  ({', '.join(f'{k}={v!r}' for k, v in options.items())})" if options else "")
                  + (f"  per token [N, T]: {', '.join(per_token[name])}" if name in per_token else ""))
    return 0
