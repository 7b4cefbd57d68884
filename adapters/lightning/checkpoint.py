"""Checkpoints of the RL loop: the Hugging Face folder users load, plus the trainer state ``--resume`` needs.

    checkpoints/step-XXXXXX/
        config.json, model.safetensors, tokenizer files   the consolidated policy (rank 0 writes it)
        trainer_state.pt                                   step, scheduler, RNG, history (+ optimizer when not sharded)
        optimizer/                                         FSDP only: the sharded optimizer state,
                                                           torch.distributed.checkpoint (one file per rank)
        rollouts/rank-XXXXX.pt                             asynchronous runs only: each rank's queued rollouts of
                                                           the next rollout.max_staleness steps
                                                           (pgzoo.adapters.lightning.pipeline)
        adapter/                                           LoRA only: the adapter in PEFT's format; the
                                                           folder's weights are then the merged W + (α/r)·B·A
        MANIFEST.json                                      sizes and checksums (pgzoo.fileio.atomic_folder)

One process or DDP: the optimizer state is the same on every rank, so rank 0 saves it in ``trainer_state.pt``.
FSDP2: the parameters are gathered tensor by tensor to rank 0 on the CPU
(``get_model_state_dict(full_state_dict=True, cpu_offload=True)``) for the Hugging Face folder, and every rank writes
its optimizer shard with ``torch.distributed.checkpoint`` (``get_optimizer_state_dict``). The folder is written under
a temporary name (chosen by rank 0, broadcast) and renamed by rank 0 after every rank finished, so a crash leaves the
previous checkpoint intact; ``trainer_state.pt`` is written last, and a folder without it is not a checkpoint.
Rank 0 writes ``MANIFEST.json`` (sizes and checksums, :mod:`pgzoo.fileio`) and fsyncs every file before the rename;
``--resume`` verifies it and falls back to the newest intact checkpoint.
"""

from __future__ import annotations

import contextlib
import errno
import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from pgzoo.adapters.lightning.distributed import full_state_dict, is_sharded, world
from pgzoo.errors import PgzooError, require
from pgzoo.fileio import atomic_folder
from pgzoo.models.tiny import CARD_NAME
from pgzoo.adapters.lightning.run_folder import STATE_FILE, checkpoint_dir, checkpoint_path

L = require("lightning", "lightning")
OPTIMIZER_DIR = "optimizer"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover
        pass
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def _broadcast(obj, rank: int):
    if world()[0] == 1:
        return obj
    box = [obj if rank == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _barrier() -> None:
    if world()[0] > 1:
        torch.distributed.barrier()


def save_checkpoint(module, path: Path, step: int, extra: dict | None = None) -> Path:
    """Write the HF checkpoint + trainer state of ``module`` to ``path`` atomically (every rank calls this).

    The folder is built under a temporary name by :func:`pgzoo.fileio.atomic_folder` on rank 0 (``MANIFEST.json`` of
    every file, fsync, rename; the name broadcast, so FSDP ranks write their optimizer shards into it) and renamed
    into place once every rank has finished. A LoRA policy writes the merged model plus ``adapter/``
    (:mod:`pgzoo.adapters.lightning.lora`). A write that fails (a full disk, a read-only folder) leaves the previous
    checkpoints as they were and raises :class:`CheckpointWriteError`."""
    from pgzoo.adapters.lightning.lora import effective_state_dict
    from pgzoo.rollout.lora import is_peft_model

    path = Path(path)
    n_ranks, rank = world()
    sharded = is_sharded(module.policy)
    lora = is_peft_model(module.policy)
    try:
        with (atomic_folder(path) if rank == 0 else contextlib.nullcontext()) as tmp:
            tmp = Path(_broadcast(str(tmp) if rank == 0 else None, rank))
            opt, sched = module._opt_and_sched()
            opt = getattr(opt, "optimizer", opt)
            weights = full_state_dict(module.policy) if (sharded or not lora) else None  # collective under FSDP
            merged = effective_state_dict(module.policy) if lora else None  # W + s*B*A (collective under FSDP)
            state: dict[str, Any] = {"step": step, "scheduler": sched.state_dict(), "rng": rng_state(),
                                     "history": module.history, "world_size": n_ranks,
                                     "recipe": module.recipe.model_dump(mode="json"), "sharded": sharded,
                                     "lora_base": getattr(module, "lora_base", None) if lora else None, **(extra or {})}
            if sharded:
                import torch.distributed.checkpoint as dcp
                from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

                dcp.save({"optimizer": get_optimizer_state_dict(module.policy, opt)},
                         checkpoint_id=str(tmp / OPTIMIZER_DIR))
            elif rank == 0:
                state["optimizer"] = opt.state_dict()
            if getattr(module, "pipeline", None) is not None:  # asynchronous: each rank's queued rollouts
                module.pipeline.save(tmp, rank, n_ranks)
            if rank == 0:
                _sampling_config(module.policy)
                if lora:
                    from pgzoo.adapters.lightning.lora import save_lora

                    save_lora(module.policy, tmp, weights, merged)
                _save_hf(module, tmp, weights if sharded else None, write_weights=not lora)
                torch.save(state, tmp / STATE_FILE)
            _barrier()  # every shard is on disk before rank 0 renames the folder into place
        _barrier()
    except OSError as exc:
        raise CheckpointWriteError(f"could not write the checkpoint of step {step} to {path}: "
                                   f"{exc.strerror or exc}{_space_hint(exc)}") from exc
    return path


class CheckpointWriteError(PgzooError, OSError):
    """A checkpoint could not be written (disk full, folder read-only or not a folder); earlier ones are intact."""


def _space_hint(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return " (the disk is full: free space or point output.dir at a larger disk)"
    if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        return " (the folder is not writable: fix its permissions or choose another output.dir)"
    return ""


def _sampling_config(policy) -> None:
    gen = getattr(policy, "generation_config", None)
    if gen is not None and getattr(gen, "top_k", None) == 0 and not gen.do_sample:
        gen.do_sample = True  # a pure-temperature sampling config (top_k=0) must say it samples to validate


def _save_hf(module, folder: Path, state_dict: dict | None, write_weights: bool = True) -> None:
    """The Hugging Face folder (weights unless ``write_weights=False``: a LoRA policy's merged weights are already
    there), with the model's own class in config.json, and the tokenizer."""
    _sampling_config(module.policy)
    if write_weights:
        module.policy.save_pretrained(folder, safe_serialization=True, state_dict=state_dict)
    if state_dict is not None or not write_weights:  # FSDP2 renamed the class (FSDP<Name>): name the model's own
        cfg_file = folder / "config.json"
        cfg = json.loads(cfg_file.read_text())
        cfg["architectures"] = [module.architecture]
        cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if module.tokenizer is not None:
        module.tokenizer.save_pretrained(folder)
    # the card names the task, so `pgzoo eval` of a checkpoint (or of the run folder) needs no --task
    task = module.recipe.task
    card = {"task": task.name, "task_options": dict(task.options), "recipe": module.recipe.name}
    (folder / CARD_NAME).write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")


def load_trainer_state(module, ckpt: Path) -> int:
    """Restore optimizer (sharded under FSDP), scheduler, RNG and history from ``ckpt`` on every rank; returns the
    next step to run. The weights come from the checkpoint's HF folder, loaded before the model is sharded."""
    ckpt = Path(ckpt)
    state = torch.load(ckpt / STATE_FILE, weights_only=False)
    opt, sched = module._opt_and_sched()
    opt = getattr(opt, "optimizer", opt)
    if is_sharded(module.policy):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        if not (ckpt / OPTIMIZER_DIR).is_dir():
            from pgzoo.errors import ConfigError

            raise ConfigError(f"{ckpt} holds no sharded optimizer state ({OPTIMIZER_DIR}/): it was written by a "
                              f"{'DDP' if state.get('world_size', 1) > 1 else 'one-process'} run; resume it with "
                              f"the strategy it was trained with (train.strategy)")
        box = {"optimizer": get_optimizer_state_dict(module.policy, opt)}
        dcp.load(box, checkpoint_id=str(ckpt / OPTIMIZER_DIR))
        set_optimizer_state_dict(module.policy, opt, box["optimizer"])
    else:
        if "optimizer" not in state:
            from pgzoo.errors import ConfigError

            raise ConfigError(f"{ckpt} holds a sharded (FSDP) optimizer state; resume it with train.strategy=fsdp")
        opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    module.history = list(state.get("history", []))
    module.last_step = state["step"]
    if getattr(module, "pipeline", None) is not None:  # asynchronous: the rollouts queued at the checkpoint
        n_ranks, rank = world()
        why = module.pipeline.restore(ckpt, rank, n_ranks, state["step"] + 1, scored=module.recipe.scores_ahead)
        if why is not None and rank == 0:
            import sys

            print(f"pgzoo: {ckpt.name}: {why}; the next rollout.max_staleness steps are sampled again from the "
                  f"checkpoint's weights (not the versions the interrupted run used)", file=sys.stderr, flush=True)
    return state["step"] + 1


class HFCheckpoint(L.Callback):
    """Save ``run_dir/checkpoints/step-XXXXXX`` (HF model + tokenizer + trainer state) every ``every`` steps and at
    the end; keep the newest ``keep``. Writes are atomic, so an interrupted save leaves the last one intact. Every
    rank takes part (FSDP gathers and shards are collective); rank 0 writes the files."""

    def __init__(self, run_dir: Path, every: int = 10, keep: int = 2, total_steps: int | None = None,
                 on_save=None, stop=None):
        self.run_dir = Path(run_dir)
        self.dir = checkpoint_dir(run_dir)
        self.every, self.keep, self.total_steps, self.on_save = every, keep, total_steps, on_save
        self.stop = stop  # a pgzoo.adapters.lightning.signals.GracefulStop: a signal ends the run after this step, checkpointed

    def on_train_start(self, trainer, module) -> None:
        if self.stop is not None:  # Lightning has installed its SIGTERM handler by now: pgzoo's goes back
            self.stop.reclaim(trainer.strategy)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = int(batch)
        last = self.total_steps is not None and step == self.total_steps - 1
        stopping = self.stop is not None and self.stop.agree(trainer.strategy)  # every rank: one all-reduce MAX
        if (self.every and (step + 1) % self.every == 0) or last or stopping:
            self.save(module, step)
        if stopping:
            self.stop.step = step
            trainer.should_stop = True

    def save(self, module, step: int) -> Path | None:
        path = save_checkpoint(module, checkpoint_path(self.run_dir, step), step)
        if world()[1] != 0:
            return None
        for old in sorted(p for p in self.dir.glob("step-*") if p != path)[:-max(self.keep - 1, 0) or None]:
            shutil.rmtree(old, ignore_errors=True)
        if self.on_save is not None:
            self.on_save(path, step)
        return path


__all__ = ["HFCheckpoint", "CheckpointWriteError",
           "save_checkpoint", "load_trainer_state", "rng_state", "set_rng_state"]
