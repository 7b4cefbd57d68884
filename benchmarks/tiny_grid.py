"""Run the paper's grid at tiny scale (the shipped ``recipes/tiny/*.yaml``) and tabulate the outcome.

    python benchmarks/tiny_grid.py [--out runs/tiny-grid] [--pattern 'offpolicy-n4-*' minirl] [--seeds 0 1]
                                   [--set rollout.engine=transformers --set rollout.fp8=true --label fp8]
    python benchmarks/tiny_grid.py --collect-only [--out runs/tiny-grid]

Each (recipe, seed) runs as its own ``pgzoo train tiny/NAME seed=S output.dir=OUT/NAME-sS[-LABEL] --quiet``
process, one after the other (a vLLM engine holds its share of RAM until its process ends), with the console output
in ``OUT/NAME-sS[-LABEL].log``. A run whose folder already holds ``summary.json`` is skipped, so an interrupted grid
continues where it stopped. The table printed at the end (Markdown) has, per run: greedy held-out accuracy before
and after, avg@k after, the mean training reward of the first and last 10 steps, the largest
``first_order/gap_total`` and mean ``kl/train_inference_k1`` over the steps, and the wall time of the command; a
second table groups the runs of one recipe over its seeds (greedy gain per seed and its mean).

One seed per recipe is a smoke test of the grid, not a comparison: on the tiny task the difference between two
seeds of one recipe can exceed the difference between two recipes. Pass several ``--seeds`` before reading a gap.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tiny_recipes(*patterns: str) -> list[str]:
    """Shipped tiny recipes (``tiny/NAME``) whose NAME matches any of the glob ``patterns``, sorted."""
    from pgzoo.recipes import shipped_recipes

    names = [n for n in shipped_recipes() if n.startswith("tiny/")]
    return [n for n in names if any(fnmatch.fnmatch(n.removeprefix("tiny/"), p) for p in patterns)]


def run_dir_name(recipe: str, seed: int, label: str) -> str:
    return f"{recipe.removeprefix('tiny/')}-s{seed}" + (f"-{label}" if label else "")


def run_one(recipe: str, seed: int, out: Path, label: str, overrides: list[str]) -> tuple[int, float]:
    run_dir = out / run_dir_name(recipe, seed, label)
    if (run_dir / "summary.json").exists():
        print(f"skip {run_dir.name}: summary.json exists", flush=True)
        return 0, float("nan")
    cmd = [sys.executable, "-m", "pgzoo.cli", "train", recipe, f"seed={seed}", f"output.dir={run_dir}",
           *overrides, "--quiet"]
    print(f"run  {run_dir.name}: {' '.join(cmd[3:])}", flush=True)
    t0 = time.perf_counter()
    with open(out / f"{run_dir.name}.log", "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    wall = time.perf_counter() - t0
    (out / f"{run_dir.name}.wall").write_text(f"{wall:.1f}\n")
    print(f"     rc={rc} in {wall:.0f} s", flush=True)
    return rc, wall


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def collect(out: Path) -> list[dict]:
    from pgzoo.train import read_metrics

    rows = []
    for run_dir in sorted(p for p in out.iterdir() if p.is_dir()):
        summary_path = run_dir / "summary.json"
        if not summary_path.exists():
            continue
        summary = json.loads(summary_path.read_text())
        evals = json.loads((run_dir / "eval.json").read_text()) if (run_dir / "eval.json").exists() else {}
        before, after = evals.get("before", {}), evals.get("after", {})
        hist = read_metrics(run_dir / "metrics.csv")
        rewards = [r["reward/mean"] for r in hist if "reward/mean" in r]
        avg_key = next((k for k in after if k.startswith("avg@")), None)
        wall_file = out / f"{run_dir.name}.wall"
        rows.append({
            "run": run_dir.name,
            "greedy_before": before.get("greedy_accuracy", float("nan")),
            "greedy_after": after.get("greedy_accuracy", float("nan")),
            "avg_after": (avg_key, after.get(avg_key, float("nan"))) if avg_key else ("avg@k", float("nan")),
            "reward_first10": _mean(rewards[:10]),
            "reward_last10": _mean(rewards[-10:]),
            "gap_total_max": max((r["first_order/gap_total"] for r in hist if "first_order/gap_total" in r),
                                 default=float("nan")),
            "kl_mean": _mean([r["kl/train_inference_k1"] for r in hist if "kl/train_inference_k1" in r]),
            "steps": summary.get("steps"),
            "wall_s": float(wall_file.read_text()) if wall_file.exists() else summary.get("seconds", float("nan")),
        })
    return rows


def _f(x: float, spec: str) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def markdown(rows: list[dict]) -> str:
    lines = ["| run | greedy before | greedy after | avg@k after | reward first/last 10 | max gap_total | "
             "mean KL(μ‖π_old) k1 | steps | wall s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        key, avg = r["avg_after"]
        lines.append(
            f"| {r['run']} | {_f(r['greedy_before'], '.3f')} | **{_f(r['greedy_after'], '.3f')}** | "
            f"{_f(avg, '.3f')} ({key}) | {_f(r['reward_first10'], '.3f')} / {_f(r['reward_last10'], '.3f')} | "
            f"{_f(r['gap_total_max'], '.2g')} | {_f(r['kl_mean'], '.1e')} | {r['steps']} | {_f(r['wall_s'], '.0f')} |")
    return "\n".join(lines)


def _recipe_of(run: str) -> tuple[str, str]:
    """``minirl-s1-fp8`` -> (``minirl``, ``fp8``): the recipe name and label of a run folder."""
    m = re.fullmatch(r"(.+)-s\d+(?:-(.+))?", run)
    return (m.group(1), m.group(2) or "") if m else (run, "")


def summarize(rows: list[dict]) -> str:
    """One line per (recipe, label) over its seeds: greedy gain (after − before) per seed and its mean, largest gap."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault(_recipe_of(r["run"]), []).append(r)
    lines = ["| recipe | seeds | greedy after − before, per seed | mean gain | max gap_total |",
             "|---|---:|---|---:|---:|"]
    for (recipe, label), rs in sorted(groups.items()):
        gains = [r["greedy_after"] - r["greedy_before"] for r in rs]
        name = f"{recipe} ({label})" if label else recipe
        lines.append(f"| {name} | {len(rs)} | {', '.join(f'{g:+.3f}' for g in gains)} | **{_mean(gains):+.3f}** | "
                     f"{_f(max(r['gap_total_max'] for r in rs), '.2g')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "tiny-grid", help="folder of the grid's run folders")
    p.add_argument("--pattern", nargs="+", default=["*"], help="globs over the tiny recipe names, e.g. "
                   "'offpolicy-n4-*' or minirl minirl-no-is")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override for every run (repeatable), e.g. rollout.fp8=true")
    p.add_argument("--label", default="", help="suffix of the run folders (use with --set)")
    p.add_argument("--collect-only", action="store_true", help="only print the table of finished runs")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    failed = []
    if not args.collect_only:
        recipes = tiny_recipes(*args.pattern)
        if not recipes:
            p.error(f"no tiny recipe matches {' '.join(args.pattern)}; see `pgzoo recipe list tiny/`")
        for seed in args.seeds:
            for recipe in recipes:
                rc, _ = run_one(recipe, seed, args.out, args.label, args.overrides)
                if rc != 0:
                    failed.append(run_dir_name(recipe, seed, args.label))
    rows = collect(args.out)
    print(markdown(rows))
    print()
    print(summarize(rows))
    if failed:
        print(f"failed (see their .log): {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
