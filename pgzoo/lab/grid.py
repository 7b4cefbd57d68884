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
    comparisons:                  # pairs compared seed by seed, each with the rule that decides it
      - {label: "(a)", a: minirl-no-is, b: minirl, expect: less, claim: "dropping the IS weight hurts"}
      - {label: "(c)", a: minirl-r3, b: minirl, expect: equivalent, margin: 0.03}

Run ``(recipe, seed)`` lives in ``OUT/<recipe stem>-s<seed>``; two runs of a grid never share a folder (a recipe
listed twice, two recipes with one file name, a seed given twice or a negative seed are refused up front). A run is
*finished* when its folder's ``status.json`` says so (``pgzoo train`` writes ``finished`` last; a run stopped by a
signal says ``stopped``, a crashed one ``failed``) and is then skipped — after checking that the recipe it recorded
is the one the grid would run now (changed ``--set`` overrides or recipe files are refused, naming the keys). Any
other run is started as
``pgzoo train RECIPE seed=S output.dir=OUT/NAME ... --resume --quiet`` in its own process, one after the other
(``jobs`` at a time with ``--jobs``, in the same order), its console in ``OUT/logs/NAME.log``: ``--resume``
continues from the newest checkpoint of an interrupted run (exactly, see docs/training.md) and starts from scratch
when there is none. A run ``running`` in another live pgzoo process (a second grid over the folder) is skipped. Interrupting the grid (Ctrl-C, or killing it)
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

from pgzoo.errors import ConfigError, require, suggest


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
    def state(self) -> str | None:
        """The run folder's state (:func:`pgzoo.adapters.lightning.run_folder.run_state`); None: not started."""
        from pgzoo.adapters.lightning.run_folder import run_state

        return run_state(self.run_dir)

    @property
    def finished(self) -> bool:
        return self.state == "finished"


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
        seeds = list(self.seeds if seeds is None else seeds)
        check_seeds(seeds, "--seeds")
        folder = Path(out if out is not None else self.out.replace("{name}", self.name))
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"--out {folder}: a file, not a folder; name a folder for the grid's run folders")
        return [GridRun(r, s, folder / f"{Path(r).stem}-s{s}") for s in seeds for r in self.recipes]


def check_seeds(seeds: list, source: str) -> None:
    """Seeds are distinct integers >= 0: a run folder is ``<recipe>-s<seed>``, and a seed given twice would count one
    run as two seeds (an interval of width 0)."""
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"{source}: seeds must be a non-empty list of integers, got {seeds!r}")
    negative = [s for s in seeds if s < 0]
    if negative:
        raise ConfigError(f"{source}: seed {negative[0]} is negative; use seeds >= 0 (a run folder is <recipe>-s<seed>)")
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    if twice:
        raise ConfigError(f"{source}: seed {twice[0]} is given twice; each seed is one run of each recipe")


def check_recipe_names(recipes: list[str], source: str) -> None:
    """Each recipe of a grid has its own file name: the run folder (and the group compared) is named after it."""
    by_stem: dict[str, list[str]] = {}
    for r in recipes:
        by_stem.setdefault(Path(r).stem, []).append(r)
    for stem, paths in by_stem.items():
        if len(paths) > 1:
            what = "is listed twice" if len(set(paths)) == 1 else f"names {len(paths)} recipes ({', '.join(paths)})"
            raise ConfigError(f"{source}: recipe {stem!r} {what}; the runs would share the folder {stem}-s<seed>. "
                              "List each recipe once, with distinct file names")


def recorded_changes(run: GridRun, overrides: list[str]) -> list[str]:
    """Keys whose value in the recipe ``run`` recorded (its ``recipe.yaml``) differs from the recipe the grid would
    run now (the recipe file, its seed, output folder and overrides); [] when nothing was recorded yet."""
    from pgzoo.adapters.lightning.run_folder import read_recipe
    from pgzoo.recipes import load_recipe
    from pgzoo.recipes.diff import changed_keys

    old = read_recipe(run.run_dir)
    if old is None:
        return []
    new = load_recipe(run.recipe, [f"seed={run.seed}", f"output.dir={run.run_dir}", *overrides])
    return changed_keys(old, new.model_dump(mode="json"))


def check_recorded(runs: list[GridRun], overrides: list[str]) -> None:
    """Refuse, before anything runs, a grid whose existing run folders recorded another recipe than the grid would run
    now: their results would be reported as the new setting's."""
    for run in runs:
        changed = recorded_changes(run, overrides)
        if changed:
            raise ConfigError(f"{run.run_dir} was run with another recipe than this grid would run now (changed: "
                              f"{', '.join(changed)}); pass the grid the overrides it was run with, or give a new "
                              "--out for the new setting")


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
    check_recipe_names(recipes, str(path))
    resolved = []
    for r in recipes:
        local = path.parent / r
        resolved.append(str(local.resolve()) if local.is_file() else str(find_recipe(r)))
        load_recipe(resolved[-1])  # a broken recipe fails here, not after the runs before it
    seeds = data.get("seeds", [0])
    check_seeds(seeds if isinstance(seeds, list) else [seeds], f"{path}: seeds")
    overrides = data.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
        raise ConfigError(f"{path}: overrides must be a list of key=value strings")
    return Grid(name=str(data.get("name", path.stem)), recipes=resolved, seeds=seeds,
                out=str(data.get("out", "runs/{name}")), overrides=list(overrides),
                description=str(data.get("description", "")),
                comparisons=_comparisons(path, data.get("comparisons") or [], [Path(r).stem for r in resolved]))


COMPARISON_KEYS = ("a", "b", "label", "expect", "margin", "claim")


def _comparisons(path: Path, entries, groups: list[str]) -> list:
    """``comparisons: [{label: "(a)", a: minirl-no-is, b: minirl, expect: less, claim: "..."}, ...]``: a and b are
    recipe names of this grid (their run folders' group names); ``expect`` (less, greater or equivalent, with
    ``margin`` for equivalent) is the rule that decides the comparison (:class:`pgzoo.lab.stats.Rule`)."""
    from pgzoo.lab.compare import Comparison
    from pgzoo.lab.stats import EXPECTS, Rule

    out = []
    for i, e in enumerate(entries if isinstance(entries, list) else [None]):
        where = f"{path}: comparisons[{i}]"
        shape = (f"{where} must be a mapping with keys a, b (recipe names of the grid), expect "
                 f"({', '.join(EXPECTS)}) and optional label, margin, claim")
        if not isinstance(e, dict):
            raise ConfigError(shape)
        for k in e:  # a misspelt key is named before the required ones are missed
            if k not in COMPARISON_KEYS:
                raise ConfigError(f"{where}.{k}: unknown key.{suggest(str(k), list(COMPARISON_KEYS))} Valid keys: "
                                  f"{', '.join(COMPARISON_KEYS)}")
            if k != "margin" and not isinstance(e[k], str):
                raise ConfigError(f"{where}.{k}={e[k]!r}: use a string")
        if not {"a", "b", "expect"} <= set(e):
            raise ConfigError(shape)
        for k in ("a", "b"):
            if e[k] not in groups:
                raise ConfigError(f"{where}.{k}={e[k]!r} is not a recipe of the grid "
                                  f"({', '.join(groups)}).{suggest(e[k], groups)}")
        if e["expect"] not in EXPECTS:
            raise ConfigError(f"{where}.expect={e['expect']!r}: use one of {', '.join(EXPECTS)}."
                              f"{suggest(e['expect'], list(EXPECTS))}")
        if e["expect"] == "equivalent" and "margin" not in e:
            raise ConfigError(f"{where}: expect: equivalent needs a margin fixed before the runs, e.g. margin: 0.03 "
                              "(reproduced when the paired 95% interval lies inside ±margin)")
        try:
            rule = Rule(e["expect"], e.get("margin"))
        except ConfigError as exc:
            raise ConfigError(f"{where}.{exc}") from None
        out.append(Comparison(e["a"], e["b"], e.get("label", ""), rule, e.get("claim", "")))
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


def check_jobs(jobs) -> int:
    """``--jobs``: a positive integer (a string or a float is refused, as everywhere in pgzoo)."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"--jobs {jobs!r}: give how many runs may train at once, a whole number >= 1 (e.g. the "
                          "number of free cores when each run uses one torch thread)")
    return jobs


def run_missing(runs: list[GridRun], overrides: list[str] | None = None, *, log=print,
                runner=subprocess.call, after_run=None, jobs: int = 1) -> list[GridRun]:
    """Run every unfinished run of ``runs`` in its own process, in order, ``jobs`` at a time (1: one after the
    other); returns the runs that failed (non-zero exit, or not ``finished`` afterwards). ``runner`` is
    :func:`subprocess.call` (tests replace it); ``after_run(run)`` is called after each run that finished
    (``pgzoo compare --record`` refreshes its summaries there, so a grid stopped after hours keeps them; never two
    at once). A run whose folder says ``running`` in a process that is still alive (another grid over the same
    folder) is skipped, not resumed beside it. Existing run folders must have recorded the recipe the grid runs now
    (:func:`check_recorded`)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from pgzoo.adapters.lightning.run_folder import running_pid

    check_jobs(jobs)
    check_recorded(runs, list(overrides or []))
    lock = threading.Lock()  # the log, walls.json and after_run: one run's bookkeeping at a time
    failed: list[GridRun] = []

    def one(i: int, run: GridRun) -> None:
        state = run.state
        if state == "finished":
            with lock:
                log(f"[{i}/{len(runs)}] skip {run.name}: finished")
            return
        pid = running_pid(run.run_dir)
        if pid is not None:
            with lock:
                log(f"[{i}/{len(runs)}] skip {run.name}: running in process {pid} "
                    f"(another grid over {run.run_dir.parent}?)")
            return
        out = run.run_dir.parent
        (out / "logs").mkdir(parents=True, exist_ok=True)
        cmd = train_command(run, list(overrides or []))
        action = ("resume" + (f" ({state})" if state else "")) if (run.run_dir / "checkpoints").is_dir() else "run"
        with lock:
            log(f"[{i}/{len(runs)}] {action} {run.name}: pgzoo train {' '.join(cmd[4:])}")
        t0 = time.perf_counter()
        with open(out / "logs" / f"{run.name}.log", "a") as fh:
            kwargs = {"preexec_fn": _die_with_parent} if sys.platform.startswith("linux") else {}
            rc = runner(cmd, stdout=fh, stderr=subprocess.STDOUT, **kwargs)
        wall = time.perf_counter() - t0
        ok = rc == 0 and run.finished
        with lock:
            _add_wall(out, run.name, wall)
            log(f"      {run.name if jobs > 1 else ''}{' ' if jobs > 1 else ''}"
                f"{'done' if ok else f'FAILED (exit {rc}; see logs/{run.name}.log)'} in {wall:.0f} s")
            if not ok:
                failed.append(run)
            elif after_run is not None:
                after_run(run)

    if jobs == 1:
        for i, run in enumerate(runs, 1):
            one(i, run)
        return failed
    # Each worker thread waits on its own child for the child's whole life, so Linux's parent-death signal (sent
    # when the thread that started a child ends) still fires only when the grid process dies.
    pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="pgzoo-grid")
    futures = [pool.submit(one, i, run) for i, run in enumerate(runs, 1)]
    try:
        for future in futures:
            future.result()
    except BaseException:  # Ctrl-C reaches the children too (one process group): start nothing new, let them stop
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    order = {run.run_dir: i for i, run in enumerate(runs)}
    return sorted(failed, key=lambda r: order[r.run_dir])
