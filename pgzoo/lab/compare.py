"""``pgzoo compare``: run a grid of recipes × seeds (resumable) and compare them over seeds, as the paper's figures do.

    pgzoo compare --grid recipes/lab/grid.yaml --seeds 0 1 2 --out runs/lab    # run what is missing, then compare
    pgzoo compare runs/a-s0 runs/a-s1 runs/b-s0 runs/b-s1 --out cmp            # compare finished run folders
    pgzoo compare --grid lab/grid --seeds 0 --set train.steps=3 --out /tmp/smoke

Runbook:

1. with ``--grid``: every ``(recipe, seed)`` whose folder lacks ``summary.json`` runs as its own ``pgzoo train``
   process, resumed from its newest checkpoint (:mod:`pgzoo.lab.grid`); ``--no-run`` only compares what is there;
2. runs are grouped by their folder name without the trailing ``-s<seed>`` (``minirl-s0``, ``minirl-s1`` ->
   ``minirl``), read through :func:`pgzoo.adapters.lightning.run_folder.read_metrics` (``metrics.csv``) and ``eval.json``;
3. ``OUT/compare.png``: one panel per paper quantity — training reward (``reward/mean``), held-out accuracy
   (``eval.json``: before, every ``eval.every`` steps, after), entropy (``entropy/mean``), training–inference KL
   (``kl/train_inference_k1``) and first-order gap (``first_order/gap_total``) — each the mean over seeds per step
   with a band from the lowest to the highest seed, one colour per group;
4. ``OUT/compare.md`` (also printed): per group the seeds, the final held-out accuracy mean ± the half-width of its
   95% confidence interval, mean ± t(0.975, n−1) · s / √n with s the sample standard deviation over seeds (none with
   one seed), the change from the starting policy, the mean KL and largest gap, collapsed seeds, and wall time.

5. with comparisons (a grid's ``comparisons``, or ``--pair A B``), a second table: for each pair of groups the
   paired difference of final held-out accuracy, A − B, seed by seed (both runs of a seed share its held-out
   problems and RL seed, and its cold start, so what they share cancels), its mean ± 95% t-interval, the
   comparison's rule (a grid's ``expect`` and ``margin``) and its verdict by that rule, "reproduced",
   "not reproduced" or "undecided" (:mod:`pgzoo.lab.stats`; ``--pair`` pairs have no rule and no verdict);
6. ``OUT/runs.csv``: one line per run (recipe, seed, steps, the held-out metric before and after, mean KL, largest
   gap, collapse step, wall seconds). ``compare.md``, ``compare.json``, ``runs.csv`` and ``walls.json`` are small
   text files: ``record`` (``pgzoo compare --record DIR``) writes them to a second folder too, one to commit.

Collapse: a seed collapses at the first step where the mean training reward of the last ``window`` (5) steps falls
below ``collapse_fraction`` (0.5) of the mean of its first ``window`` steps — the reward drop the paper reports when
training becomes unstable.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from pgzoo.errors import ConfigError, require, suggest
from pgzoo.lab.stats import Rule, mean_ci

PANELS = (("reward/mean", "training reward"), ("heldout", "held-out accuracy"), ("entropy/mean", "entropy"),
          ("kl/train_inference_k1", "train–inference KL (k1)"), ("first_order/gap_total", "first-order gap"))


@dataclass
class Run:
    """One finished (or partial) run folder, read back."""

    path: Path
    group: str
    seed: int | None
    rows: list[dict[str, float]]
    evals: dict
    wall: float | None = None

    def series(self, key: str) -> dict[int, float]:
        if key == "heldout":
            return self.heldout_series()
        return {int(r["step"]): r[key] for r in self.rows if key in r and "step" in r}

    def heldout_series(self, metric: str | None = None) -> dict[int, float]:
        """Held-out accuracy by step: before (0), every ``eval.every`` steps (``during``), after (last step + 1)."""
        metric = metric or self.metric
        out = {}
        if metric in self.evals.get("before", {}):
            out[0] = self.evals["before"][metric]
        for step, res in self.evals.get("during", {}).items():
            if metric in res:
                out[int(step)] = res[metric]
        if metric in self.evals.get("after", {}):
            out[self.steps] = self.evals["after"][metric]
        return out

    @property
    def steps(self) -> int:
        """Global steps run: the last training row's step + 1 (rows logged by periodic evaluation repeat a step)."""
        return max((int(r["step"]) + 1 for r in self.rows if "step" in r and "reward/mean" in r), default=0)

    @property
    def metric(self) -> str:
        """The held-out metric compared: avg@k (sampled, as the paper) when evaluated, else greedy accuracy."""
        keys = self.evals.get("after") or self.evals.get("before") or {}
        return next((k for k in sorted(keys) if k.startswith("avg@")), "greedy_accuracy")


def group_name(folder: str) -> str:
    """``minirl-s0`` -> ``minirl``: a run folder's name without the trailing seed suffix."""
    return re.sub(r"-s\d+$", "", folder)


def read_run(path: str | Path, walls: dict[str, float] | None = None) -> Run:
    from pgzoo.adapters.lightning.run_folder import read_metrics, read_recipe

    path = Path(path)
    if not (path / "metrics.csv").is_file():
        raise ConfigError(f"{path} is not a run folder (no metrics.csv); pass folders written by `pgzoo train`")
    evals = _json(path / "eval.json")
    recorded = read_recipe(path)
    recipe_seed = recorded.get("seed") if recorded is not None else None
    wall = (walls or {}).get(path.name)
    if wall is None:
        wall = _json(path / "summary.json").get("seconds")
    return Run(path, group_name(path.name), recipe_seed, read_metrics(path / "metrics.csv"), evals, wall)


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def collapse_step(rewards: dict[int, float], window: int = 5, fraction: float = 0.5) -> int | None:
    """First step whose trailing ``window``-step mean reward is below ``fraction`` × the first ``window`` steps' mean."""
    steps = sorted(rewards)
    if len(steps) < 2 * window:
        return None
    vals = [rewards[s] for s in steps]
    base = sum(vals[:window]) / window
    for i in range(2 * window - 1, len(vals)):
        if sum(vals[i - window + 1: i + 1]) / window < fraction * base:
            return steps[i]
    return None


@dataclass
class Group:
    """The runs of one recipe over seeds and their aggregates."""

    name: str
    runs: list[Run] = field(default_factory=list)

    def curve(self, key: str) -> tuple[list[int], list[float], list[float], list[float]]:
        """(steps, mean, min, max) over the seeds, at the steps every seed has."""
        per = [r.series(key) for r in self.runs]
        steps = sorted(set.intersection(*(set(p) for p in per))) if per else []
        vals = [[p[s] for p in per] for s in steps]
        return steps, [sum(v) / len(v) for v in vals], [min(v) for v in vals], [max(v) for v in vals]

    def final(self) -> list[float]:
        return [r.evals["after"][r.metric] for r in self.runs if r.metric in r.evals.get("after", {})]

    def start(self) -> list[float]:
        return [r.evals["before"][r.metric] for r in self.runs if r.metric in r.evals.get("before", {})]

    def summary(self, window: int = 5, fraction: float = 0.5) -> dict:
        final, start = self.final(), self.start()
        mean, half = mean_ci(final)
        gains = [r.evals["after"][r.metric] - r.evals["before"][r.metric] for r in self.runs
                 if r.metric in r.evals.get("after", {}) and r.metric in r.evals.get("before", {})]
        kl = [v for r in self.runs for v in r.series("kl/train_inference_k1").values()]
        gaps = [v for r in self.runs for v in r.series("first_order/gap_total").values()]
        walls = [r.wall for r in self.runs if r.wall is not None]
        return {
            "group": self.name, "seeds": len(self.runs), "metric": self.runs[0].metric if self.runs else None,
            "final_mean": mean, "final_ci95": half, "finals": final,
            "start_mean": mean_ci(start)[0], "gain_mean": mean_ci(gains)[0], "gain_ci95": mean_ci(gains)[1],
            "kl_mean": sum(kl) / len(kl) if kl else math.nan, "gap_max": max(gaps) if gaps else math.nan,
            "collapse_steps": [collapse_step(r.series("reward/mean"), window, fraction) for r in self.runs],
            "wall_mean_s": sum(walls) / len(walls) if walls else math.nan,
        }


def group_runs(runs: list[Run]) -> list[Group]:
    groups: dict[str, Group] = {}
    for r in runs:
        groups.setdefault(r.group, Group(r.group)).runs.append(r)
    return list(groups.values())


def _f(x, spec: str) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def markdown(groups: list[Group]) -> str:
    """The comparison table (see the module docstring)."""
    lines = ["| recipe | seeds | final held-out (mean ± 95% CI) | start | change (mean ± 95% CI) | mean KL k1 | "
             "max gap | collapsed (step) | wall s / run |", "|---|---:|---|---:|---|---:|---:|---|---:|"]
    for g in groups:
        s = g.summary()
        ci = "" if s["final_ci95"] is None else f" ± {s['final_ci95']:.3f}"
        gci = "" if s["gain_ci95"] is None else f" ± {s['gain_ci95']:.3f}"
        col = [c for c in s["collapse_steps"] if c is not None]
        collapsed = f"{len(col)}/{s['seeds']} ({', '.join(map(str, col))})" if col else f"0/{s['seeds']}"
        lines.append(f"| {g.name} | {s['seeds']} | **{_f(s['final_mean'], '.3f')}**{ci} ({s['metric']}) | "
                     f"{_f(s['start_mean'], '.3f')} | {_f(s['gain_mean'], '+.3f')}{gci} | {_f(s['kl_mean'], '.1e')} | "
                     f"{_f(s['gap_max'], '.2g')} | {collapsed} | {_f(s['wall_mean_s'], '.0f')} |")
    return "\n".join(lines)


@dataclass(frozen=True)
class Comparison:
    """``a`` against ``b`` (group names), a finding's label, the rule that decides it (:class:`pgzoo.lab.stats.Rule`;
    None: no verdict, as for ``--pair``) and the paper's claim in words."""

    a: str
    b: str
    label: str = ""
    rule: Rule | None = None
    claim: str = ""


def paired(groups: list[Group], comparison: Comparison) -> dict:
    """The paired difference of final held-out accuracy, ``a − b``, over the seeds both groups finished, and the
    comparison's verdict by its rule."""
    by = {g.name: g for g in groups}
    missing = [n for n in (comparison.a, comparison.b) if n not in by]
    if missing:
        return {"seeds": 0, "missing": missing, "diffs": [], "mean": math.nan, "ci95": None,
                "verdict": "undecided" if comparison.rule else None}
    finals = [{r.seed: r.evals["after"][r.metric] for r in by[n].runs if r.metric in r.evals.get("after", {})}
              for n in (comparison.a, comparison.b)]
    seeds = sorted(set(finals[0]) & set(finals[1]), key=lambda x: (x is None, x))
    diffs = [finals[0][s] - finals[1][s] for s in seeds]
    mean, half = mean_ci(diffs)
    verdict = comparison.rule.verdict(mean, half) if comparison.rule else None
    return {"seeds": len(seeds), "missing": [], "diffs": diffs, "mean": mean, "ci95": half, "verdict": verdict}


def paired_markdown(groups: list[Group], comparisons: list[Comparison]) -> str:
    """The paired table (see the module docstring)."""
    lines = ["| comparison | A − B | seeds | per-seed differences | mean ± 95% CI | 95% interval | rule | verdict | "
             "claim |", "|---|---|---:|---|---|---|---|---|---|"]
    for c in comparisons:
        p = paired(groups, c)
        rule = "–" if c.rule is None else str(c.rule)
        if p["missing"]:
            mean, interval = "–", f"not run: {', '.join(p['missing'])}"
        elif p["ci95"] is None:
            mean, interval = f"{p['mean']:+.3f}", "– (one seed)"
        else:
            mean = f"{p['mean']:+.3f} ± {p['ci95']:.3f}"
            interval = f"[{p['mean'] - p['ci95']:+.3f}, {p['mean'] + p['ci95']:+.3f}]"
        verdict = f"**{p['verdict']}**" if p["verdict"] == "reproduced" else (p["verdict"] or "–")
        diffs = ", ".join(f"{d:+.3f}" for d in p["diffs"]) or "–"
        lines.append(f"| {c.label} | {c.a} − {c.b} | {p['seeds']} | {diffs} | {mean} | {interval} | {rule} | "
                     f"{verdict} | {c.claim} |")
    return "\n".join(lines)


def plot(groups: list[Group], path: Path) -> Path:
    """The paper's panels (see the module docstring) into one PNG."""
    matplotlib = require("matplotlib", "lightning")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.0 * len(PANELS), 3.4))
    colours = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20")
    for i, g in enumerate(groups):
        for ax, (key, title) in zip(axes, PANELS):
            steps, mean, lo, hi = g.curve(key)
            if not steps:
                continue
            ax.plot(steps, mean, color=colours(i % colours.N), lw=1.4, marker="." if key == "heldout" else None,
                    label=f"{g.name} (n={len(g.runs)})")
            ax.fill_between(steps, lo, hi, color=colours(i % colours.N), alpha=0.18, lw=0)
    for ax, (key, title) in zip(axes, PANELS):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if key in ("kl/train_inference_k1", "first_order/gap_total"):
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle("mean over seeds, band: lowest to highest seed", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def check_pairs(pairs: list, groups: list[str], source: str) -> None:
    """Both sides of every compared pair name a group (a recipe of the grid, or run folders given)."""
    for a, b in pairs:
        for side in (a, b):
            if side not in groups:
                raise ConfigError(f"{source}: {side!r} is not a group of this comparison.{suggest(side, groups)} "
                                  f"Groups: {', '.join(groups)}")


RUNS_CSV = ("recipe", "seed", "steps", "metric", "before", "after", "kl_mean", "gap_max", "collapse_step", "wall_s")


def runs_csv(groups: list[Group]) -> str:
    """One line per run (``OUT/runs.csv``, see the module docstring)."""
    lines = [",".join(RUNS_CSV)]
    for g in groups:
        for r in g.runs:
            kl = list(r.series("kl/train_inference_k1").values())
            gap = list(r.series("first_order/gap_total").values())
            row = (g.name, r.seed, r.steps, r.metric, r.evals.get("before", {}).get(r.metric),
                   r.evals.get("after", {}).get(r.metric), sum(kl) / len(kl) if kl else None,
                   max(gap) if gap else None, collapse_step(r.series("reward/mean")),
                   None if r.wall is None else round(r.wall, 1))
            lines.append(",".join("" if v is None else format(v, ".6g") if isinstance(v, float) else str(v)
                                  for v in row))
    return "\n".join(lines) + "\n"


def compare(run_dirs: list[str | Path], out: str | Path, walls: dict[str, float] | None = None,
            comparisons: list[Comparison] | None = None, *, record: str | Path | None = None,
            figure: bool = True, planned: list[str] | None = None) -> tuple[str, Path | None]:
    """Aggregate ``run_dirs`` (see the module docstring); writes ``OUT/compare.png`` (unless not ``figure``),
    ``compare.md``, ``compare.json`` and ``runs.csv``, the text files also to ``record`` with ``walls.json``.
    A comparison may name a group of ``planned`` (a grid's recipes) that has no finished run yet ("not run"); any
    other name must be a group of ``run_dirs``."""
    out = Path(out)
    for flag, folder in (("--out", out), ("--record", record)):
        if folder is not None and Path(folder).exists() and not Path(folder).is_dir():
            raise ConfigError(f"{flag} {folder}: a file, not a folder; name a folder for compare.png and compare.md")
    runs = [read_run(p, walls) for p in run_dirs]
    if not runs:
        raise ConfigError("pgzoo compare: no run folders to compare; pass run folders or --grid")
    seen: dict[tuple, Path] = {}
    for r in runs:  # one run counted twice would narrow every interval it enters
        key = (r.group, r.seed) if r.seed is not None else (r.path.resolve(),)
        if key in seen:
            raise ConfigError(f"pgzoo compare: {r.path} and {seen[key]} are the same run (group {r.group!r}, seed "
                              f"{r.seed}); give each run once")
        seen[key] = r.path
    groups = group_runs(runs)
    check_pairs([(c.a, c.b) for c in comparisons or []], [g.name for g in groups] + list(planned or []), "--pair")
    out.mkdir(parents=True, exist_ok=True)
    png = plot(groups, out / "compare.png") if figure else None
    table = markdown(groups)
    if comparisons:
        table += "\n\nPaired by seed (final held-out accuracy, A − B):\n\n" + paired_markdown(groups, comparisons)
    summary = [g.summary() for g in groups]
    if comparisons:
        summary.append({"paired": [{"a": c.a, "b": c.b, "label": c.label, "claim": c.claim,
                                    "rule": None if c.rule is None else {"expect": c.rule.expect,
                                                                         "margin": c.rule.margin},
                                    **paired(groups, c)} for c in comparisons]})
    texts = {"compare.md": table + "\n", "compare.json": json.dumps(summary, indent=1, default=str) + "\n",
             "runs.csv": runs_csv(groups)}
    if walls is not None:
        texts["walls.json"] = json.dumps(walls, indent=1, sort_keys=True) + "\n"
    for folder in (out, record):
        if folder is None:
            continue
        Path(folder).mkdir(parents=True, exist_ok=True)
        for name, text in texts.items():
            if folder == out and name == "walls.json":
                continue  # the grid runner's own file
            tmp = Path(folder) / f".{name}.tmp"
            tmp.write_text(text)
            tmp.replace(Path(folder) / name)
    return table, png
