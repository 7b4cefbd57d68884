"""What ``pgzoo train --resume`` does before the first step: find an intact checkpoint, hold the run to its recipe,
and give back the run folder's history.

- :func:`intact_checkpoint`: removes what a killed checkpoint write left (:func:`pgzoo.fileio.clean_stale`), then
  takes the newest checkpoint whose files match its ``MANIFEST.json`` (:func:`pgzoo.fileio.verify_folder`). A
  damaged one is moved aside (``checkpoints/damaged-step-XXXXXX``, kept for inspection) and the next older one is
  used, saying so; with none intact the resume is refused.
- :func:`check_recipe`: the recipe recorded in the checkpoint must equal the one given, except keys the user
  allows with ``--allow-change KEY`` (:func:`pgzoo.recipes.diff.check_resume`).
- :func:`write_recipe`: ``recipe.yaml`` is never overwritten with a different recipe; a resume that changed allowed
  keys keeps its recipe beside it as ``recipe.resume-step-XXXXXX.yaml``.
- :func:`kept_rows`: the metrics rows up to the checkpoint, from the checkpoint's own history (not from
  metrics.csv, which a kill may have left behind or ahead of the checkpoint), plus the evaluation rows metrics.csv
  recorded up to that step.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pgzoo.errors import ConfigError
from pgzoo.fileio import clean_stale, verify_folder
from pgzoo.adapters.lightning.run_folder import STATE_FILE, checkpoint_dir, read_metrics


def intact_checkpoint(run_dir: Path, say=print, *, lead: bool = True) -> Path | None:
    """The newest intact checkpoint of ``run_dir`` (None when the run folder holds none); see the module doc. Only
    the ``lead`` rank cleans and moves folders; the others read the same answer."""
    folder = checkpoint_dir(run_dir)
    for stale in clean_stale(folder) if lead else ():
        say(f"pgzoo: removed {stale.name}, left by an interrupted checkpoint write")
    candidates = sorted((p for p in folder.glob("step-*") if p.is_dir()), reverse=True)
    damaged: list[str] = []
    for ckpt in candidates:
        problem = verify_folder(ckpt) if (ckpt / STATE_FILE).is_file() else f"{STATE_FILE} is missing"
        if problem is None:
            if damaged:
                say(f"pgzoo: resuming from {ckpt.name}, the newest intact checkpoint")
            return ckpt
        damaged.append(f"{ckpt.name} ({problem})")
        if lead:
            aside, n = ckpt.with_name(f"damaged-{ckpt.name}"), 1
            while aside.exists():  # damaged again after an earlier fallback: keep both
                aside, n = ckpt.with_name(f"damaged-{ckpt.name}.{n}"), n + 1
            os.replace(ckpt, aside)
            say(f"pgzoo: checkpoint {ckpt.name} is damaged ({problem}); moved aside to {aside}")
    if damaged:
        raise ConfigError(f"--resume: no intact checkpoint in {folder}: {'; '.join(damaged)} (moved aside as "
                          f"damaged-step-*); start the run again without --resume in a new output.dir, or restore a "
                          f"checkpoint from a copy")
    return None


def starting_checkpoint(run_dir: Path, resume: bool, say=print, *, lead: bool = True) -> Path | None:
    """The checkpoint a run starts from: with ``resume`` the newest intact one (None: there is none yet, the run
    starts from the beginning); without, None, after refusing a folder that already holds checkpoints. Leftovers of
    a killed checkpoint write are removed either way."""
    if resume:
        ckpt = intact_checkpoint(run_dir, say, lead=lead)
        if ckpt is None:
            say(f"pgzoo: no checkpoint in {run_dir}; starting from the beginning")
        return ckpt
    if lead:
        clean_stale(checkpoint_dir(run_dir))
    if any((p / STATE_FILE).is_file() for p in checkpoint_dir(run_dir).glob("step-*")):
        raise ConfigError(f"run folder {run_dir} already holds checkpoints; continue it with --resume, or start a "
                          f"new run with output.dir=runs/another-name")
    return None


def load_state(ckpt: Path) -> dict[str, Any]:
    """The trainer state of ``ckpt`` (step, recipe, history, optimizer, ...)."""
    import torch

    return torch.load(Path(ckpt) / STATE_FILE, weights_only=False, map_location="cpu")


def check_recipe(state: dict, recipe, allowed=(), *, ckpt: Path) -> list[str]:
    """Refuse a recipe that differs from the checkpoint's except for ``allowed`` keys; returns the changed keys."""
    from pgzoo.recipes.diff import check_resume

    recorded = state.get("recipe")
    if recorded is None:  # a checkpoint written before recipes were recorded: nothing to compare with
        return []
    return check_resume(recorded, recipe.model_dump(mode="json"), tuple(allowed), checkpoint=str(ckpt))


def write_recipe(run_dir: Path, recipe, *, resume_step: int | None = None) -> Path:
    """Write ``recipe.yaml`` (a fresh run), or on resume keep it and add ``recipe.resume-step-XXXXXX.yaml`` when
    the recipe changed; returns the file written (or the unchanged recipe.yaml)."""
    run_dir = Path(run_dir)
    main = run_dir / "recipe.yaml"
    text = recipe.dump()
    if resume_step is not None and main.is_file():
        if main.read_text() == text:
            return main
        path = run_dir / f"recipe.resume-step-{resume_step:06d}.yaml"
    else:
        path = main
    path.write_text(text)
    return path


def prepare_run_dir(run_dir: Path) -> None:
    """Create ``run_dir``, or raise a ConfigError when it is a file or cannot be written to."""
    run_dir = Path(run_dir)
    fix = "set output.dir to a writable folder, e.g. output.dir=runs/my-run"
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"output.dir={str(run_dir)!r} is a file, not a folder; {fix}")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".pgzoo-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"output.dir={str(run_dir)!r} cannot be written to ({exc.strerror or exc}); {fix}") from None


def kept_rows(state: dict | None, run_dir: Path, start: int) -> list[dict]:
    """The metrics rows of steps 0..start-1 to write back into metrics.csv on resume (see the module doc)."""
    if state is None:
        return []
    rows = [dict(r) for r in state.get("history", []) if r.get("step", 0) <= start - 1]
    evals = [r for r in read_metrics(Path(run_dir) / "metrics.csv") if r.get("step", 0) <= start - 1
             and any(k.startswith("eval/") for k in r) and "reward/mean" not in r]
    return sorted(rows + evals, key=lambda r: r["step"])  # stable: a step's training row before its evaluation


__all__ = ["starting_checkpoint", "intact_checkpoint",
           "load_state", "check_recipe", "write_recipe", "prepare_run_dir", "kept_rows"]
