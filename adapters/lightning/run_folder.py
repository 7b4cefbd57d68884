"""The run folder (``output.dir``): every file a run reads or writes, in one place.

    recipe.yaml                     the resolved recipe
    metrics.csv                     one row per global step (Lightning CSVLogger; TensorBoard / W&B as asked)
    eval.json                       held-out evaluation before / during / after
    plots/*.png                     reward, entropy, training-inference KL per step
    checkpoints/step-XXXXXX/        Hugging Face model + tokenizer + trainer_state.pt (+ optimizer/ under FSDP)
    summary.json                    steps, seconds, evaluations, first/last reward, final checkpoint
    status.json                     the run's state: running, finished, stopped (a signal) or failed

Only rank 0 writes here (checkpoints: every rank contributes its optimizer shard under FSDP, rank 0 renames).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from pgzoo.errors import ConfigError, DependencyError, require

STATE_FILE = "trainer_state.pt"


@dataclass
class TrainResult:
    """What a run produced: its folder, the evaluations before/after, the per-step metrics and the timing."""

    run_dir: Path
    eval_before: dict[str, float] | None = None
    eval_after: dict[str, float] | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    checkpoint: Path | None = None


# ---------------------------------------------------------------------- checkpoints
def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_path(run_dir: Path, step: int) -> Path:
    """The folder of the checkpoint written after global step ``step`` (0-based): ``step-{step+1:06d}``."""
    return checkpoint_dir(run_dir) / f"step-{step + 1:06d}"


def latest_checkpoint(run_dir: Path, intact: bool = False) -> Path | None:
    """The newest complete step checkpoint in ``run_dir/checkpoints`` (None if there is none); with ``intact``, the
    newest whose files also match its ``MANIFEST.json`` (what an error's resume hint may call intact)."""
    from pgzoo.fileio import verify_folder

    ckpts = sorted(p for p in checkpoint_dir(run_dir).glob("step-*") if (p / STATE_FILE).is_file())
    while ckpts and intact and verify_folder(ckpts[-1]) is not None:
        ckpts.pop()
    return ckpts[-1] if ckpts else None


def checkpoint_step(ckpt: Path) -> int:
    """The last completed global step stored in ``ckpt``."""
    import torch

    return int(torch.load(Path(ckpt) / STATE_FILE, weights_only=False)["step"])


# ---------------------------------------------------------------------- files
def read_eval(run_dir: Path) -> dict:
    return _read_json(Path(run_dir) / "eval.json")


def write_eval(run_dir: Path, evals: dict) -> None:
    _write_json(Path(run_dir) / "eval.json", evals)


def write_summary(run_dir: Path, summary: dict) -> None:
    _write_json(Path(run_dir) / "summary.json", summary)


def read_recipe(run_dir: Path) -> dict | None:
    """The recipe a run recorded (``recipe.yaml``) as a dict, None when it has none; a damaged file is a pgzoo error
    naming it (a comparison or a grid must not read half a recipe)."""
    path = Path(run_dir) / "recipe.yaml"
    if not path.is_file():
        return None
    yaml = require("yaml", "lightning")
    try:
        recorded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]}); the run folder is damaged: move it "
                          "away, or delete it to run it again") from None
    if not isinstance(recorded, dict):
        raise ConfigError(f"{path}: not a recipe (a YAML mapping); the run folder is damaged: move it away, or delete "
                          "it to run it again")
    return recorded


# ---------------------------------------------------------------------- the run's state
STATUS_FILE = "status.json"
STATES = ("running", "finished", "stopped", "failed")


def write_status(run_dir: Path, state: str, **detail) -> None:
    """Record the run's state in ``status.json`` (atomically). Never raises: a run folder that cannot take the file
    (full disk, read-only) already fails with a clearer error of its own."""
    if state not in STATES:
        raise ValueError(f"run state {state!r} is not one of {STATES}")
    with contextlib.suppress(OSError):
        _write_json(Path(run_dir) / STATUS_FILE, {"state": state, "time": round(time.time(), 3), **detail})


def run_state(run_dir: Path) -> str | None:
    """``running``, ``finished``, ``stopped`` or ``failed`` from ``status.json``; for a folder written before that
    file existed, ``finished`` when its ``summary.json`` has no ``interrupted`` key and ``stopped`` when it has;
    None when the folder holds no run. A ``running`` folder whose process died reads ``running``: whoever resumes
    it finds the newest intact checkpoint."""
    run_dir = Path(run_dir)
    state = _read_json(run_dir / STATUS_FILE).get("state")
    if state in STATES:
        return state
    summary = run_dir / "summary.json"
    if summary.is_file():
        return "stopped" if "interrupted" in _read_json(summary) else "finished"
    return None


def running_pid(run_dir: Path) -> int | None:
    """The process id a ``running`` status recorded, while a ``pgzoo`` process with that id is alive (another
    process is training this folder now); None otherwise (not running, or its process died: the folder can be
    resumed). On Linux the process's command line must name pgzoo, so an id reused after a restart is not taken
    for the run."""
    status = _read_json(Path(run_dir) / STATUS_FILE)
    pid = status.get("pid")
    if status.get("state") != "running" or isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # alive, another user's
        pass
    cmdline = Path(f"/proc/{pid}/cmdline")
    if Path("/proc/self").exists():
        try:
            if b"pgzoo" not in cmdline.read_bytes():
                return None
        except OSError:
            return None
    return pid


@contextlib.contextmanager
def recorded_status(run_dir: Path, *, enabled: bool = True):
    """``running`` while the block runs, then ``finished``, ``stopped`` (a signal: an exception with a 128 + signal
    ``exit_code``, or Ctrl-C) or ``failed`` (any other exception, its message kept)."""
    if enabled:
        write_status(run_dir, "running", pid=os.getpid())
    try:
        yield
    except BaseException as exc:
        if enabled:
            signalled = isinstance(exc, KeyboardInterrupt) or getattr(exc, "exit_code", 0) > 128
            write_status(run_dir, "stopped" if signalled else "failed", error=f"{type(exc).__name__}: {exc}"[:2000])
        raise
    else:
        if enabled:
            write_status(run_dir, "finished")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def read_metrics(path: Path) -> list[dict[str, float]]:
    """The rows of a run folder's ``metrics.csv`` as ``{column: float}`` (empty cells left out; [] if absent)."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    try:
        with path.open(newline="") as fh:
            for line, row in enumerate(csv.DictReader(fh), start=2):
                if None in row:  # more cells than the header names
                    raise ValueError(f"line {line} has {len(row) - 1 + len(row[None])} cells, the header names "
                                     f"{len(row) - 1}")
                rows.append({k: float(v) for k, v in row.items() if v not in ("", None)})
    except (ValueError, csv.Error, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not a readable metrics file ({exc}); it was damaged after the run wrote it. "
                          "A run resumed with --resume rewrites it from its checkpoint") from None
    return rows


PLOTS = {"reward": ("reward/mean", "reward/accuracy"), "entropy": ("entropy/mean",),
         "train_inference_kl": ("kl/train_inference_k1",)}


def plot_run(run_dir: Path, history: list[dict[str, float]]) -> list[Path]:
    """PNG plots of reward, entropy and training-inference KL per step into ``run_dir/plots``."""
    matplotlib = require("matplotlib", "lightning")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(run_dir) / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    fig_all, axes = plt.subplots(1, len(PLOTS), figsize=(4.2 * len(PLOTS), 3.2))
    for ax_all, (name, keys) in zip(axes, PLOTS.items()):
        fig, ax = plt.subplots(figsize=(5, 3.4))
        for key in keys:
            pts = [(r["step"], r[key]) for r in history if key in r and "step" in r]
            if pts:
                xs, ys = zip(*pts)
                for a in (ax, ax_all):
                    a.plot(xs, ys, marker=".", label=key)
        for a in (ax, ax_all):
            a.set_xlabel("step")
            a.set_title(name.replace("_", " "))
            a.grid(alpha=0.3)
            if a.lines:
                a.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / f"{name}.png", dpi=110)
        plt.close(fig)
        written.append(out_dir / f"{name}.png")
    fig_all.tight_layout()
    fig_all.savefig(out_dir / "summary.png", dpi=110)
    plt.close(fig_all)
    return written + [out_dir / "summary.png"]


def summary_dict(recipe, result: TrainResult) -> dict:
    last = result.history[-1] if result.history else {}
    first = result.history[0] if result.history else {}
    return {"recipe": recipe.name, "steps": len(result.history), "seconds": round(result.seconds, 1),
            "eval_before": result.eval_before, "eval_after": result.eval_after,
            "reward_first": first.get("reward/mean"), "reward_last": last.get("reward/mean"),
            "checkpoint": str(result.checkpoint) if result.checkpoint else None}


def print_summary(recipe, result: TrainResult) -> None:
    """The final summary table (rich when installed, plain text otherwise)."""
    rows: list[tuple[str, str, str]] = []
    b, a = result.eval_before or {}, result.eval_after or {}
    for key in sorted(set(b) | set(a)):
        if key.startswith(("num_", "mean_", "greedy_eos")):
            continue
        rows.append((f"eval {key}", _fmt(b.get(key)), _fmt(a.get(key))))
    h = result.history
    for key in ("reward/mean", "reward/accuracy", "response/length_mean", "entropy/mean", "kl/train_inference_k1",
                "time/step"):
        vals = [r[key] for r in h if key in r]
        if vals:
            rows.append((key, _fmt(vals[0]), _fmt(vals[-1])))
    title = (f"pgzoo train {recipe.name}: {len(h)} steps in {result.seconds / 60:.1f} min -> "
             f"{result.checkpoint or result.run_dir}")
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for col in ("metric", "first / before", "last / after"):
            table.add_column(col, justify="right" if col != "metric" else "left")
        for r in rows:
            table.add_row(*r)
        Console().print(table)
    except ImportError:  # pragma: no cover
        print(title)
        for r in rows:
            print(f"  {r[0]:32s} {r[1]:>12s} {r[2]:>12s}")


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4g}"


# ---------------------------------------------------------------------- loggers
def loggers(recipe, run_dir: Path, kept_rows: list[dict] | None = None) -> list:
    """Lightning loggers of ``output.loggers``. The CSV logger rewrites metrics.csv from scratch, so on resume the
    rows up to the checkpoint (``kept_rows``: the checkpoint's own history, :func:`pgzoo.adapters.lightning.resume.kept_rows`) are
    written into it again first."""
    L = require("lightning", "lightning")
    out = []
    for name in recipe.output.loggers:
        if name == "csv":
            # every row on disk when its step ends (Lightning's default buffers 100): a killed run keeps its rows
            csv_logger = L.pytorch.loggers.CSVLogger(str(run_dir), name="", version="", flush_logs_every_n_steps=1)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                writer = csv_logger.experiment  # created now: it deletes an existing metrics.csv
            writer.metrics = [dict(r, step=int(r["step"])) for r in (kept_rows or [])]
            writer.save()  # write them back at once: a failure before the first new step loses nothing
            out.append(csv_logger)
        elif name == "tensorboard":
            _require_logger("tensorboard")
            out.append(L.pytorch.loggers.TensorBoardLogger(str(run_dir), name="tb", version=""))
        elif name == "wandb":
            _require_logger("wandb")
            out.append(L.pytorch.loggers.WandbLogger(name=recipe.name, save_dir=str(run_dir)))
    return out


def _require_logger(module: str) -> None:
    import importlib

    try:
        importlib.import_module(module)
    except ImportError:
        raise DependencyError(f"output.loggers asks for {module!r} but the {module} package is not installed; "
                              f"pip install {module}, or drop it from output.loggers") from None


def finalize_loggers(trainer) -> None:
    for lg in trainer.loggers:
        try:
            lg.save()
        except Exception:  # pragma: no cover - a logger failing to flush must not lose the run's other outputs
            pass


