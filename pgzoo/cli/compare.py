"""``pgzoo compare``: run a grid of recipes × seeds (resumable), then compare the runs over seeds
(:mod:`pgzoo.lab.compare` holds the runbook and the statistics, :mod:`pgzoo.lab.grid` the grid runner).

    pgzoo compare --grid recipes/lab/grid.yaml --seeds 0 1 2 --out runs/lab
    pgzoo compare runs/a-s0 runs/a-s1 runs/b-s0 runs/b-s1 --out cmp
    pgzoo compare --grid lab/grid --out runs/lab --record docs/results/lab    # summaries to commit, kept as it goes
    pgzoo compare --grid lab/grid --out runs/lab --jobs 2                     # two runs training at once
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pgzoo.errors import ConfigError
from pgzoo.lab import grid as grid_mod
from pgzoo.lab.compare import Comparison, check_pairs, compare


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="*", help="finished run folders (written by `pgzoo train`)")
    parser.add_argument("--grid", help="grid YAML (e.g. recipes/lab/grid.yaml or lab/grid): run what is missing")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds of the grid (default: the grid's)")
    parser.add_argument("--out", default=None, help="folder of the grid's runs and of compare.png / compare.md "
                                                    "(default: the grid's `out`, or ./compare)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override for every run of the grid (repeatable), e.g. train.steps=3")
    parser.add_argument("--record", default=None, metavar="DIR",
                        help="also write the text summaries (compare.md, compare.json, runs.csv, walls.json) to DIR, "
                             "e.g. docs/results/lab; with --grid refreshed after every finished run")
    parser.add_argument("--no-run", action="store_true", help="with --grid: compare the finished runs only")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="with --grid: train up to N runs at once, in the grid's order (default 1; each run "
                             "uses train.threads torch threads, 1 in the lab's recipes)")
    parser.add_argument("--pair", nargs=2, action="append", default=[], metavar=("A", "B"),
                        help="also compare group A with group B paired by seed (repeatable; a grid's "
                             "`comparisons` are added)")


def run(args: argparse.Namespace) -> int:
    if args.grid and args.run_dirs:
        raise ConfigError("pgzoo compare: give run folders or --grid, not both")
    if not args.grid:
        if args.jobs != 1:
            raise ConfigError("pgzoo compare --jobs: only with --grid (it says how many of the grid's runs train at "
                              "once); comparing finished run folders trains nothing")
        if not args.run_dirs:
            raise ConfigError("pgzoo compare: give run folders, or --grid GRID.yaml to run and compare a grid")
        table, png = compare(args.run_dirs, args.out or "compare", comparisons=[Comparison(a, b) for a, b in args.pair],
                             record=args.record)
        print(table)
        print(f"\nfigure: {png}")
        return 0
    grid_mod.check_jobs(args.jobs)  # before hours of runs
    grid = grid_mod.load_grid(args.grid)
    planned = [Path(r).stem for r in grid.recipes]
    check_pairs(args.pair, planned, "--pair")  # before hours of runs, not after
    runs = grid.runs(args.seeds, args.out)
    out = runs[0].run_dir.parent
    pairs = [*grid.comparisons, *(Comparison(a, b) for a, b in args.pair)]

    def record(_run) -> None:  # the text summaries so far, after each finished run (no figure: seconds saved)
        compare([r.run_dir for r in runs if r.finished], out, grid_mod.read_walls(out), pairs, record=args.record,
                figure=False, planned=planned)

    failed = [] if args.no_run else grid_mod.run_missing(runs, [*grid.overrides, *args.overrides],
                                                         log=lambda m: print(m, flush=True),
                                                         after_run=record if args.record else None,
                                                         jobs=args.jobs)
    done = [r.run_dir for r in runs if r.finished]
    if not done:
        raise ConfigError(f"no finished run in {out}; run without --no-run (see {out}/logs/ for failures)")
    table, png = compare(done, out, grid_mod.read_walls(out), pairs, record=args.record, planned=planned)
    print(table)
    walls = grid_mod.read_walls(out)
    print(f"\nfigure: {png}\ntable: {out / 'compare.md'}\nwall time of the runs: {sum(walls.values()) / 60:.1f} min "
          f"({len(done)}/{len(runs)} runs finished)")
    if failed:
        print(f"failed (see {out}/logs/): {', '.join(r.name for r in failed)}")
        return 1
    return 0
