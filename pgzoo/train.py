"""``pgzoo train RECIPE [key=value ...]``: the main job — the GRPO-style Lightning loop driven by a recipe.

    pgzoo train recipes/tiny/minirl.yaml                       # the embedded default (vLLM CPU rollouts)
    pgzoo train recipes/tiny/minirl.yaml train.steps=5 output.dir=runs/quick
    pgzoo train recipes/tiny/minirl.yaml --dry-run             # print the resolved plan, run nothing
    pgzoo train recipes/tiny/minirl.yaml --resume              # continue the run in output.dir exactly

Runbook of :func:`train`:

1. load and check the recipe (types, combinations, then the user-supplied paths);
2. the task, and the policy checkpoint: ``model.path``, or the embedded tiny MoE's cached cold start
   (:func:`pgzoo.models.cold_start.ensure_cold_start`); with ``--resume`` the newest checkpoint of the run folder;
3. held-out evaluation before training (:func:`pgzoo.evaluate.evaluate`: greedy accuracy, avg@k, pass@k);
4. the rollout engine (vLLM or transformers) loaded from the same checkpoint, the objective, the LightningModule
   (:class:`pgzoo.adapters.lightning.RLModule`) and a Lightning ``Trainer`` (manual optimisation, CSV logger,
   progress bar, atomic Hugging Face checkpoints every ``output.checkpoint_every`` steps);
5. ``trainer.fit`` over the global steps; then evaluation after training, PNG plots and a summary table.

The run folder (``output.dir``): ``recipe.yaml`` (resolved), ``metrics.csv`` (one row per step), ``eval.json``,
``plots/*.png``, ``checkpoints/step-XXXXXX/`` (HF model + tokenizer + ``trainer_state.pt``: optimizer, scheduler,
RNG states, step), ``summary.json``. Resume is exact on CPU with a fixed seed: every step's prompts and sampling seed
are functions of (recipe seed, step), and the optimizer/RNG state comes back from the checkpoint.

``train.devices = N > 1`` runs this runbook in N spawned processes, one torch.distributed rank each (gloo on CPU, one
GPU per rank on CUDA); rank 0 alone evaluates, writes the run folder and prints (see docs/training.md, "DDP").

Failures keep work: checkpoints are written atomically, so the engine dying mid-run leaves the last one intact and the
error says how to continue (``--resume``); a reward function that raises names the sample it failed on.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pgzoo.errors import ConfigError, DependencyError, PgzooError, require


@dataclass
class TrainResult:
    """What a run produced: its folder, the evaluations before/after, the per-step metrics and the timing."""

    run_dir: Path
    eval_before: dict[str, float] | None = None
    eval_after: dict[str, float] | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    checkpoint: Path | None = None


# ---------------------------------------------------------------------- pieces (tests monkeypatch these)
def build_engine(recipe, model_path: Path):
    """The rollout engine of ``recipe.rollout``, loaded from ``model_path``."""
    rollout = require("pgzoo.rollout", "hf")
    r = recipe.rollout
    if r.engine == "vllm":
        max_len = r.max_model_len or _default_max_model_len(recipe)
        share, kw = r.gpu_memory_utilization, {}
        world = _world_size()
        if world > 1 and not _cuda_available():
            # N ranks on one CPU machine: each engine gets 1/N of the KV-cache cap (a share of RAM) and of the cores,
            # so N engines together take what one would (on GPUs every rank has its own device and full share)
            share, kw = share / world, {"cpu_threads": max(1, (os.cpu_count() or 1) // world)}
        return rollout.VLLMEngine(str(model_path), dtype=r.dtype, gpu_memory_utilization=share,
                                  max_model_len=max_len, seed=recipe.seed,
                                  enable_return_routed_experts=recipe.train.routing_replay == "R3", **kw)
    return rollout.TransformersEngine(str(model_path), dtype=r.dtype, fp8=r.fp8, router_dtype=r.router_dtype)


def _default_max_model_len(recipe) -> int:
    try:
        cfg = json.loads((Path(recipe.model.path or "") / "config.json").read_text())
        limit = int(cfg.get("max_position_embeddings", 0)) or None
    except (OSError, ValueError):
        limit = None
    want = 128 + recipe.rollout.max_new_tokens
    return min(want, limit) if limit else want


def resolve_model_path(recipe, task) -> Path:
    """``model.path`` or the cached cold start of the embedded tiny MoE for the recipe's task."""
    if recipe.model.path is not None:
        return Path(os.path.expanduser(recipe.model.path))
    from pgzoo.models.cold_start import ensure_cold_start

    return Path(ensure_cold_start(recipe.task.name, dict(recipe.task.options), seed=recipe.seed,
                                  **recipe.model.cold_start))


def load_policy(path: Path, dtype: str):
    torch = require("torch", "hf")
    transformers = require("transformers", "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype))
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    tok.padding_side = "left"
    return model.eval(), tok


def eval_problems(recipe, task) -> dict[str, list]:
    """Benchmark name -> problems: the task's held-out split, or the user's files (``eval.files``)."""
    if not recipe.eval.files:
        return {"heldout": task.sample(recipe.eval.num_problems, split="test", seed=recipe.seed + 12345)}
    import pgzoo.tasks

    out = {}
    base = {k: v for k, v in recipe.task.options.items() if k not in ("path",)}
    for name, path in recipe.eval.files.items():
        t = pgzoo.tasks.get("math", path=path, **base)
        out[name] = [p for split in ("train", "test") for p in t.splits[split]]
    return out


def run_eval(recipe, policy, tokenizer, task, problems: dict[str, list]) -> dict[str, float]:
    from pgzoo.evaluate import evaluate

    e = recipe.eval
    out: dict[str, float] = {}
    for name, probs in problems.items():
        res = evaluate(policy, tokenizer, task, probs, k=e.k, temperature=e.temperature,
                       max_new_tokens=e.max_new_tokens or recipe.rollout.max_new_tokens)
        prefix = "" if name == "heldout" else f"{name}/"
        out.update({f"{prefix}{k}": float(v) for k, v in res.items() if isinstance(v, (int, float))})
    return out


def loop_config(recipe):
    from pgzoo.adapters.lightning import LoopConfig

    r, t = recipe.rollout, recipe.train
    return LoopConfig(prompts_per_step=r.prompts_per_step, group_size=r.group_size, max_new_tokens=r.max_new_tokens,
                      temperature=r.temperature, top_p=r.top_p, num_minibatches=t.num_minibatches,
                      micro_batch_size=t.micro_batch_size, lr=t.lr, weight_decay=t.weight_decay,
                      betas=tuple(t.betas), grad_clip=t.grad_clip, warmup_steps=t.warmup_steps,
                      routing_replay=t.routing_replay, logprob_chunk_size=t.logprob_chunk_size,
                      advantage=recipe.objective.advantage, use_rollout_logprobs=r.logprobs == "engine",
                      seed=recipe.seed, verify_sync=r.verify_sync)


# ---------------------------------------------------------------------- the run
def train(recipe, *, resume: bool = False, quiet: bool = False, command: str | None = None) -> TrainResult | None:
    """Run ``recipe`` end to end (see the module runbook); returns a :class:`TrainResult`.

    With ``train.devices = N > 1`` this starts N processes (:func:`_launch`) that each run this function as one rank
    of a torch.distributed group and returns rank 0's result. Called inside an initialised process group (a rank),
    it runs that rank's share and returns ``None`` on ranks other than 0.

    ``command`` is how the user started the run (for the ``--resume`` hint of a failure message).
    """
    torch = require("torch", "hf")
    L = require("lightning", "lightning")
    import pgzoo
    import pgzoo.tasks
    from pgzoo.adapters import lightning as pl_adapter

    t_start = time.perf_counter()
    _quiet_frameworks()
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    # 1. recipe: types and combinations were checked on load; now this machine and the user-supplied paths
    recipe.check_environment()
    world, rank = _world_size(), _rank()
    if recipe.train.devices > 1 and world == 1:
        return _launch(recipe, resume=resume, quiet=quiet, command=command)
    lead = rank == 0  # rank 0 alone evaluates, logs, plots, checkpoints and summarises; the others wait at barriers
    if not lead:
        say = lambda *a: None  # noqa: E731
    recipe.check_files()
    run_dir = recipe.run_dir
    ckpt = pl_adapter.latest_checkpoint(run_dir) if resume else None
    if lead and not resume and pl_adapter.latest_checkpoint(run_dir) is not None:
        raise ConfigError(f"run folder {run_dir} already holds checkpoints; continue it with --resume, or start a "
                          f"new run with output.dir=runs/another-name")
    if resume and ckpt is None:
        say(f"pgzoo: no checkpoint in {run_dir}; starting from the beginning")
    start, kept_rows, loggers = 0, [], []
    if ckpt is not None:
        start = pl_adapter.checkpoint_step(ckpt) + 1
    if lead:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(recipe.dump())
        if ckpt is not None:
            kept_rows = [r for r in read_metrics(run_dir / "metrics.csv") if r.get("step", 0) <= start - 1]
        loggers = _loggers(recipe, run_dir, kept_rows)  # before anything heavy: a missing logger package fails fast
    # 2. task and policy
    torch.manual_seed(recipe.seed)
    task = pgzoo.tasks.get(recipe.task.name, **recipe.task.options)
    base_path = resolve_model_path(recipe, task)
    policy_path = ckpt or base_path
    policy, tokenizer = load_policy(policy_path, recipe.model.dtype)
    # 3. evaluation before training (skipped on resume: it was recorded in eval.json)
    problems = eval_problems(recipe, task) if (recipe.eval.before or recipe.eval.after or recipe.eval.every) else {}
    evals = _read_json(run_dir / "eval.json") if ckpt is not None else {}
    if lead and recipe.eval.before and "before" not in evals:
        say(f"pgzoo: evaluating the starting policy on {sum(map(len, problems.values()))} held-out problems ...")
        evals["before"] = run_eval(recipe, policy, tokenizer, task, problems)
        _write_json(run_dir / "eval.json", evals)
    _barrier()
    # 4. engine, objective, module, trainer
    objective = pgzoo.get(recipe.objective.name, **recipe.objective.options)
    ref_policy = None
    if "ref_logprobs" in objective.requires:
        ref_policy, _ = load_policy(base_path, recipe.model.dtype)
        ref_policy.requires_grad_(False)
    say(f"pgzoo: starting the {recipe.rollout.engine} rollout engine from {policy_path} ...")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # engine-internal deprecation notices
        engine = build_engine(recipe, policy_path)
    module = pl_adapter.RLModule(policy, tokenizer, objective, task, engine, loop_config(recipe), ref_policy)
    if ckpt is not None:
        say(f"pgzoo: resuming from {ckpt} at step {start}")
    checkpoint_cb = pl_adapter.HFCheckpoint(run_dir, every=recipe.output.checkpoint_every,
                                            keep=recipe.output.keep_checkpoints, total_steps=recipe.train.steps)
    callbacks: list[Any] = [checkpoint_cb]
    if lead and recipe.eval.every:
        callbacks.append(_PeriodicEval(recipe, tokenizer, task, problems, run_dir, evals))
    bar = recipe.output.progress_bar and not quiet and lead
    if bar:
        callbacks.append(L.pytorch.callbacks.TQDMProgressBar(refresh_rate=1))
    # one device per process: under the launcher each rank sees only its own GPU (CUDA_VISIBLE_DEVICES)
    trainer = L.Trainer(accelerator="cpu" if not torch.cuda.is_available() else "auto", devices=1,
                        max_epochs=1, logger=loggers if lead else False, callbacks=callbacks,
                        enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                        log_every_n_steps=1, enable_progress_bar=bar,
                        use_distributed_sampler=False, deterministic=False)
    # 5. the global steps
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers|exists and is not "
                                          "empty|LightningModule.optimizers|`training_step` returned).*")
        warnings.filterwarnings("ignore", category=UserWarning, module="lightning")
        warnings.filterwarnings("ignore", message=".*treespec.*")
        try:
            if start < recipe.train.steps:
                if ckpt is not None:
                    _restore_into_trainer(trainer, module, ckpt)
                trainer.fit(module, train_dataloaders=pl_adapter.step_loader(start, recipe.train.steps))
            # before the engine closes: closing an in-process vLLM engine tears the process group down
            digests = _gather_digests(module.policy) if world > 1 else None
        except PgzooError as exc:
            last = pl_adapter.latest_checkpoint(run_dir)
            how = command or f"pgzoo train <recipe> output.dir={run_dir}"
            where = (f"The last checkpoint ({last}) is intact; continue with: {how} --resume"
                     if last is not None else "No checkpoint had been written yet; rerun to start again.")
            exc.args = (f"{exc.args[0] if exc.args else exc}. {where}", *exc.args[1:])
            raise
        finally:
            _close(engine)
    _finalize_loggers(trainer)
    if not lead:
        return None
    if digests is not None and len(set(digests)) != 1:
        raise PgzooError(f"the {world} ranks ended with different weights (parameter digests {digests}); the "
                         "run's data-parallel update is broken, please report it with the recipe")
    # 6. evaluation after training, plots, summary
    if recipe.eval.after and "after" not in evals:
        say("pgzoo: evaluating the trained policy ...")
        evals["after"] = run_eval(recipe, module.policy, tokenizer, task, problems)
        _write_json(run_dir / "eval.json", evals)
    history = read_metrics(run_dir / "metrics.csv") or module.history
    if recipe.output.plots:
        plot_run(run_dir, history)
    result = TrainResult(run_dir, evals.get("before"), evals.get("after"), history,
                         time.perf_counter() - t_start, pl_adapter.latest_checkpoint(run_dir))
    summary = _summary_dict(recipe, result)
    if digests is not None:
        summary["devices"], summary["rank_param_digests"] = world, digests
    _write_json(run_dir / "summary.json", summary)
    if not quiet:
        print_summary(recipe, result)
    return result


class _PeriodicEval(require("lightning", "lightning").Callback):
    def __init__(self, recipe, tokenizer, task, problems, run_dir, evals):
        self.recipe, self.tokenizer, self.task, self.problems = recipe, tokenizer, task, problems
        self.run_dir, self.evals = run_dir, evals

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        step = int(batch)
        if (step + 1) % self.recipe.eval.every == 0 and step + 1 < self.recipe.train.steps:
            res = run_eval(self.recipe, module.policy, self.tokenizer, self.task, self.problems)
            self.evals.setdefault("during", {})[str(step + 1)] = res
            _write_json(self.run_dir / "eval.json", self.evals)
            for lg in module.loggers:
                lg.log_metrics({f"eval/{k}": v for k, v in res.items()}, step=step)


def _quiet_frameworks() -> None:
    """Keep the console to pgzoo's progress bar and summary: no framework banners or per-load progress bars."""
    import logging

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric.utilities.rank_zero").setLevel(logging.WARNING)
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def _restore_into_trainer(trainer, module, ckpt) -> None:
    """Optimizer state must be loaded after Lightning builds the optimizers: defer to on_train_start."""
    from pgzoo.adapters import lightning as pl_adapter

    L = require("lightning", "lightning")

    class _Restore(L.Callback):
        def on_train_start(self, trainer, module):
            pl_adapter.load_trainer_state(module, ckpt)

    trainer.callbacks.insert(0, _Restore())


def _loggers(recipe, run_dir: Path, kept_rows: list[dict] | None = None) -> list:
    """Lightning loggers of ``output.loggers``. The CSV logger rewrites metrics.csv from scratch, so on resume the
    rows up to the checkpoint (``kept_rows``) are queued into it again first."""
    L = require("lightning", "lightning")
    out = []
    for name in recipe.output.loggers:
        if name == "csv":
            # flushed every step: a run killed between checkpoints keeps its rows up to the last one for --resume
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


def _finalize_loggers(trainer) -> None:
    for lg in trainer.loggers:
        try:
            lg.save()
        except Exception:  # pragma: no cover - a logger failing to flush must not lose the run's other outputs
            pass


def _close(engine) -> None:
    close = getattr(engine, "close", None)
    if close is not None:
        try:
            close()
        except Exception:  # pragma: no cover
            pass


# ---------------------------------------------------------------------- multi-process launching (train.devices > 1)
DIST_TIMEOUT_S = float(os.environ.get("PGZOO_DIST_TIMEOUT", 1800))  # a rank stuck in a collective this long fails


def _world_size() -> int:
    import torch.distributed as d

    return d.get_world_size() if d.is_available() and d.is_initialized() else 1


def _rank() -> int:
    import torch.distributed as d

    return d.get_rank() if d.is_available() and d.is_initialized() else 0


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _barrier() -> None:
    if _world_size() > 1:
        import torch.distributed as d

        d.barrier()


def param_digest(model) -> str:
    """SHA-256 of a model's parameters (names, dtypes, shapes, bytes): equal on every rank after a correct DDP step."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for name, p in model.named_parameters():
        t = p.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _gather_digests(model) -> list[str]:
    import torch.distributed as d

    out: list[Any] = [None] * _world_size()
    d.all_gather_object(out, param_digest(model))
    return [str(x) for x in out]


def _launch(recipe, *, resume: bool, quiet: bool, command: str | None) -> TrainResult:
    """Start ``train.devices`` processes (spawn), one rank each (gloo on CPU; NCCL for CUDA tensors with one GPU per
    rank), and wait for them. The first rank to fail is reported as one :class:`PgzooError`; the others are killed
    (no hang on a collective that will never complete)."""
    import multiprocessing.connection
    import pickle
    import tempfile

    import torch.multiprocessing as mp

    world = recipe.train.devices
    if _cuda_available():
        import torch

        if torch.cuda.device_count() < world:
            raise ConfigError(f"train.devices={world} but this machine has {torch.cuda.device_count()} GPU(s); one "
                              f"GPU per process: set train.devices={torch.cuda.device_count()}")
    # cheap checks and the shared cold start here, once, before any process starts
    from pgzoo.adapters import lightning as pl_adapter

    recipe.check_files()
    if not resume and pl_adapter.latest_checkpoint(recipe.run_dir) is not None:
        raise ConfigError(f"run folder {recipe.run_dir} already holds checkpoints; continue it with --resume, or "
                          f"start a new run with output.dir=runs/another-name")
    if recipe.model.path is None:
        resolve_model_path(recipe, None)
    if not quiet:
        print(f"pgzoo: starting {world} processes ({'NCCL/GPU' if _cuda_available() else 'gloo/CPU'}); rank 0 logs",
              flush=True)
    ctx = mp.get_context("spawn")
    tasks = _picklable_tasks()
    with tempfile.TemporaryDirectory(prefix="pgzoo-ranks-") as tmp:
        tmp_path = Path(tmp)
        procs = []
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        try:
            for rank in range(world):
                if _cuda_available():  # the child reads it at start: it sees only its GPU, as cuda:0
                    ids = visible.split(",") if visible else [str(i) for i in range(world)]
                    os.environ["CUDA_VISIBLE_DEVICES"] = ids[rank]
                p = ctx.Process(target=_rank_main, name=f"pgzoo-rank-{rank}",
                                args=(rank, world, str(tmp_path), recipe, resume, quiet, command, tasks))
                p.start()
                procs.append(p)
        finally:
            if visible is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = visible
        try:
            while any(p.exitcode is None for p in procs):
                multiprocessing.connection.wait([p.sentinel for p in procs if p.exitcode is None], timeout=1.0)
                if any(p.exitcode not in (None, 0) for p in procs):
                    break
        finally:
            _stop(procs)
        failed = [r for r, p in enumerate(procs) if p.exitcode != 0]
        if failed:
            raise _rank_error(tmp_path, procs, failed)
        with (tmp_path / "result.pkl").open("rb") as fh:
            return pickle.load(fh)


def _stop(procs, grace: float = 5.0) -> None:
    """Terminate the processes still running (a failed rank's peers wait on collectives forever), then kill."""
    for p in procs:
        if p.exitcode is None:
            p.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.exitcode is None:
            p.kill()
            p.join()


def _rank_error(tmp: Path, procs, failed: list[int]) -> PgzooError:
    """One error for the parent: the first rank that reported an exception (its peers then fail on the broken
    collective, or were killed), with that exception's class when it is a pgzoo error."""
    import pickle

    reports = []
    for path in tmp.glob("error-*.pkl"):
        try:
            reports.append(pickle.loads(path.read_bytes()))
        except Exception:  # pragma: no cover - a half-written report
            pass
    world = len(procs)
    if not reports:
        codes = ", ".join(f"rank {r} exit code {procs[r].exitcode}" for r in failed)
        return PgzooError(f"train.devices={world}: a process died without an error report ({codes}): killed by a "
                          "signal or out of memory, or it could not start (ranks are spawned: they re-import the "
                          "launching script, so a script that calls pgzoo.train.train needs an "
                          "`if __name__ == '__main__':` guard, and cannot be read from stdin); the other ranks "
                          "were stopped")
    first = min(reports, key=lambda r: r["time"])
    where = f"traceback in {first['traceback_file']}; " if first.get("traceback_file") else ""
    msg = (f"rank {first['rank']} of {world} failed: {first['type']}: {first['message']} "
           f"({where}the other ranks were stopped)")
    cls = first.get("cls")
    if isinstance(cls, type) and issubclass(cls, PgzooError):
        try:
            return cls(msg)
        except Exception:  # pragma: no cover - a subclass with another constructor
            pass
    return PgzooError(msg)


def _picklable_tasks() -> dict:
    """The task registry of this process, for the ranks: tasks registered at runtime (``pgzoo.tasks.register``) exist
    in every rank too, when their class is importable by name."""
    import pickle

    from pgzoo.tasks.base import _TASKS

    out = {}
    for name, cls in _TASKS.items():
        try:
            pickle.dumps(cls)
        except Exception:
            continue
        out[name] = cls
    return out


def _rank_main(rank: int, world: int, tmp: str, recipe, resume: bool, quiet: bool, command: str | None,
               tasks: dict | None = None) -> None:
    """One rank: join the process group, run :func:`train`; report an exception to the parent through a file."""
    import datetime
    import pickle
    import traceback

    import torch
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    from pgzoo.tasks.base import _TASKS

    for name, cls in (tasks or {}).items():
        _TASKS.setdefault(name, cls)
    try:
        from lightning.fabric.utilities.rank_zero import rank_zero_only

        rank_zero_only.rank = rank  # Lightning's own rank-0-only output follows our rank
    except ImportError:  # pragma: no cover
        pass
    cuda = torch.cuda.is_available()
    if not cuda:  # N ranks share the cores
        torch.set_num_threads(max(1, torch.get_num_threads() // world))
    try:
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", init_method=f"file://{tmp}/rendezvous",
                                rank=rank, world_size=world, timeout=datetime.timedelta(seconds=DIST_TIMEOUT_S))
        if cuda:
            torch.cuda.set_device(0)
        result = train(recipe, resume=resume, quiet=quiet or rank != 0, command=command)
        if rank == 0:
            with open(os.path.join(tmp, "result.pkl"), "wb") as fh:
                pickle.dump(result, fh)
    except BaseException as exc:
        report = {"rank": rank, "time": time.time(), "type": type(exc).__name__,
                  "message": str(exc.args[0]) if len(exc.args) == 1 else str(exc), "cls": type(exc),
                  "traceback": traceback.format_exc()}
        try:  # the full traceback goes to the run folder; the console gets the parent's one-line error
            tb_file = Path(recipe.run_dir) / f"rank-{rank}-error.txt"
            tb_file.parent.mkdir(parents=True, exist_ok=True)
            tb_file.write_text(report["traceback"])
            report["traceback_file"] = str(tb_file)
        except OSError:
            pass
        path = os.path.join(tmp, f"error-{rank}.pkl")
        try:
            data = pickle.dumps(report)
        except Exception:
            report["cls"] = None
            data = pickle.dumps(report)
        with open(path + ".tmp", "wb") as fh:
            fh.write(data)
        os.replace(path + ".tmp", path)
        os._exit(1)  # no process-group teardown: the peers may be blocked in a collective with us
    if dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------- run-folder files
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
    if not path.exists():
        return []
    rows = []
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            rows.append({k: float(v) for k, v in row.items() if v not in ("", None)})
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


def _summary_dict(recipe, result: TrainResult) -> dict:
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


# ---------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML, or a shipped recipe's name, e.g. recipes/tiny/minirl.yaml "
                        "or tiny/minirl (see `pgzoo recipe list`)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=3e-4")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved plan and exit")
    parser.add_argument("--resume", action="store_true", help="continue the run in output.dir from its newest "
                                                               "checkpoint (exactly: same metrics as uninterrupted)")
    parser.add_argument("--print-recipe", action="store_true", help="also print the resolved YAML")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary table")


def run(args: argparse.Namespace) -> int:
    from pgzoo.recipes import load_recipe

    recipe = load_recipe(args.recipe, args.overrides).check_environment()
    if args.dry_run or args.print_recipe:
        print(recipe.plan())
        if args.print_recipe:
            print(recipe.dump())
        if args.dry_run:
            return 0
    command = " ".join(["pgzoo train", args.recipe, *args.overrides])
    train(recipe, resume=args.resume, quiet=args.quiet, command=command)
    return 0


if __name__ == "__main__":  # pragma: no cover
    from pgzoo.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
