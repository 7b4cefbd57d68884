"""A grid of recipes × seeds, run one ``pgzoo train`` process per run, resumable (``pgzoo compare --grid``).

    grid = load_grid("recipes/lab/grid.yaml")                    # or a shipped name: "lab/grid"
    runs = grid.runs(seeds=[0, 1, 2], out="runs/lab")            # [GridRun(recipe, seed, run_dir), ...]
    run_missing(runs, overrides=["train.steps=3"])               # skips finished runs, resumes interrupted ones

A grid file is YAML::

    name: lab
    description: ...
    out: runs/lab                 # default folder of the run folders (``--out`` wins)
    seeds: [0, 1, 2]              # default seeds (``--seeds`` wins)
    overrides: []                 # key=value applied to every run (``--set`` adds to them)
    recipes:                      # recipe files relative to the grid file, or shipped names (tiny/minirl)
      - minirl.yaml
      - minirl-no-is.yaml

Run ``(recipe, seed)`` lives in ``OUT/<recipe stem>-s<seed>``. It is *finished* when its folder holds
``summary.json`` (``pgzoo train`` writes it last) and is then skipped. Any other run is started as
``pgzoo train RECIPE seed=S output.dir=OUT/NAME ... --resume --quiet`` in its own process, one after the other, its
console in ``OUT/logs/NAME.log``: ``--resume`` continues from the newest checkpoint of an interrupted run (exactly,
see docs/training.md) and starts from scratch when there is none. Interrupting the grid (Ctrl-C, or killing it)
stops the running child too (on Linux the child is killed when its parent dies), so the next invocation resumes
it. The wall time of every process that returned is added to ``OUT/walls.json`` (seconds per run, summed over
attempts; an attempt cut short by killing the grid itself is not counted).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pgzoo.errors import ConfigError, require


@dataclass(frozen=True)
class GridRun:
    """One ``(recipe, seed)`` of a grid and its run folder."""

    recipe: str
    seed: int
    run_dir: Path

    @property
    def name(self) -> str:
        return self.run_dir.name

    @property
    def finished(self) -> bool:
        return (self.run_dir / "summary.json").is_file()


@dataclass
class Grid:
    """A parsed grid file (see the module docstring)."""

    name: str
    recipes: list[str]
    seeds: list[int] = field(default_factory=lambda: [0])
    out: str = "runs/{name}"
    overrides: list[str] = field(default_factory=list)
    description: str = ""
    comparisons: list = field(default_factory=list)  # pgzoo.lab.compare.Comparison: pairs compared seed by seed

    def runs(self, seeds: list[int] | None = None, out: str | os.PathLike | None = None) -> list[GridRun]:
        """Every ``(recipe, seed)``, seed-major (all recipes of seed 0 first: a partial grid is a comparison)."""
        folder = Path(out if out is not None else self.out.replace("{name}", self.name))
        return [GridRun(r, s, folder / f"{Path(r).stem}-s{s}") for s in (seeds or self.seeds) for r in self.recipes]


def _find_grid(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_file():
        return p
    from pgzoo.recipes.catalog import shipped_recipe_dir

    shipped = shipped_recipe_dir()
    key = p.as_posix().removeprefix("./").removeprefix("recipes/")
    for cand in (key, key + ".yaml"):
        if shipped is not None and (shipped / cand).is_file():
            return shipped / cand
    raise ConfigError(f"grid {str(path)!r}: no such file and no shipped grid of that name; give a grid YAML "
                      "(e.g. recipes/lab/grid.yaml)")


def load_grid(path: str | os.PathLike) -> Grid:
    """Parse a grid file; recipe entries that are files next to it become absolute paths, others stay names
    (checked with :func:`pgzoo.recipes.catalog.find_recipe`)."""
    yaml = require("yaml", "lightning")
    from pgzoo.recipes import load_recipe
    from pgzoo.recipes.catalog import find_recipe

    path = _find_grid(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    allowed = {"name", "description", "out", "seeds", "overrides", "recipes", "comparisons"}
    if not isinstance(data, dict) or set(data) - allowed:
        extra = sorted(set(data) - allowed) if isinstance(data, dict) else []
        raise ConfigError(f"{path}: a grid is a mapping with keys {', '.join(sorted(allowed))}"
                          + (f"; unknown: {', '.join(extra)}" if extra else ""))
    recipes = data.get("recipes")
    if not isinstance(recipes, list) or not recipes or not all(isinstance(r, str) for r in recipes):
        raise ConfigError(f"{path}: recipes must be a non-empty list of recipe files or names")
    resolved = []
    for r in recipes:
        local = path.parent / r
        resolved.append(str(local.resolve()) if local.is_file() else str(find_recipe(r)))
        load_recipe(resolved[-1])  # a broken recipe fails here, not after the runs before it
    seeds = data.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                          for s in seeds):
        raise ConfigError(f"{path}: seeds must be a non-empty list of integers")
    overrides = data.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
        raise ConfigError(f"{path}: overrides must be a list of key=value strings")
    return Grid(name=str(data.get("name", path.stem)), recipes=resolved, seeds=seeds,
                out=str(data.get("out", "runs/{name}")), overrides=list(overrides),
                description=str(data.get("description", "")),
                comparisons=_comparisons(path, data.get("comparisons") or [], [Path(r).stem for r in resolved]))


def _comparisons(path: Path, entries, groups: list[str]) -> list:
    """``comparisons: [{a: minirl-no-is, b: minirl, label: "(a)", expect: "A < B"}, ...]``; a and b are recipe
    names of this grid (their run folders' group names)."""
    from pgzoo.lab.compare import Comparison

    out = []
    for i, e in enumerate(entries if isinstance(entries, list) else [None]):
        keys = {"a", "b", "label", "expect"}
        if not isinstance(e, dict) or not {"a", "b"} <= set(e) <= keys or \
                not all(isinstance(v, str) for v in e.values()):
            raise ConfigError(f"{path}: comparisons[{i}] must be a mapping with string keys a, b (recipe names of "
                              f"the grid) and optional label, expect")
        for k in ("a", "b"):
            if e[k] not in groups:
                raise ConfigError(f"{path}: comparisons[{i}].{k}={e[k]!r} is not a recipe of the grid "
                                  f"({', '.join(groups)})")
        out.append(Comparison(e["a"], e["b"], e.get("label", ""), e.get("expect", "")))
    return out


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the child is killed when the grid process dies (even by SIGKILL), so no orphan run keeps writing into
    a folder that the next invocation resumes. SIGKILL, not SIGTERM: the training process handles SIGTERM (the
    trainer's own handler) and would outlive its parent. Checkpoints are written atomically, so nothing is lost but
    the steps since the last one."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def train_command(run: GridRun, overrides: list[str]) -> list[str]:
    """The ``pgzoo train`` command of one run (always ``--resume``: it starts from scratch without a checkpoint)."""
    return [sys.executable, "-m", "pgzoo", "train", run.recipe, f"seed={run.seed}", f"output.dir={run.run_dir}",
            *overrides, "--resume", "--quiet"]


def read_walls(out: Path) -> dict[str, float]:
    try:
        data = json.loads((Path(out) / "walls.json").read_text())
        return {str(k): float(v) for k, v in data.items()}
    except (OSError, ValueError, AttributeError):
        return {}


def _add_wall(out: Path, name: str, seconds: float) -> None:
    walls = read_walls(out)
    walls[name] = round(walls.get(name, 0.0) + seconds, 1)
    tmp = out / ".walls.json.tmp"
    tmp.write_text(json.dumps(walls, indent=1, sort_keys=True))
    os.replace(tmp, out / "walls.json")


def run_missing(runs: list[GridRun], overrides: list[str] | None = None, *, log=print,
                runner=subprocess.call) -> list[GridRun]:
    """Run every unfinished run of ``runs`` in its own process, one after the other; returns the runs that failed
    (non-zero exit, or no ``summary.json`` afterwards). ``runner`` is :func:`subprocess.call` (tests replace it)."""
    failed = []
    for i, run in enumerate(runs, 1):
        if run.finished:
            log(f"[{i}/{len(runs)}] skip {run.name}: finished")
            continue
        out = run.run_dir.parent
        (out / "logs").mkdir(parents=True, exist_ok=True)
        cmd = train_command(run, list(overrides or []))
        state = "resume" if (run.run_dir / "checkpoints").is_dir() else "run"
        log(f"[{i}/{len(runs)}] {state} {run.name}: pgzoo train {' '.join(cmd[4:])}")
        t0 = time.perf_counter()
        with open(out / "logs" / f"{run.name}.log", "a") as fh:
            kwargs = {"preexec_fn": _die_with_parent} if sys.platform.startswith("linux") else {}
            rc = runner(cmd, stdout=fh, stderr=subprocess.STDOUT, **kwargs)
        wall = time.perf_counter() - t0
        _add_wall(out, run.name, wall)
        ok = rc == 0 and run.finished
        log(f"      {'done' if ok else f'FAILED (exit {rc}; see logs/{run.name}.log)'} in {wall:.0f} s")
        if not ok:
            failed.append(run)
    return failed
