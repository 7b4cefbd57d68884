"""A recipe end to end on pgzoo's Lightning trainer: what ``pgzoo train RECIPE`` runs (:mod:`pgzoo.cli.train`).

    from pgzoo.recipes import load_recipe
    from pgzoo.adapters.lightning.run import train
    result = train(load_recipe("tiny/minirl", ["train.steps=5", "output.dir=runs/quick"]))

Runbook of :func:`train` (every rank runs it; rank 0 alone evaluates, logs and writes the run folder):

1. load and check the recipe (types, combinations, then the user-supplied paths);
2. the task, and the policy checkpoint: ``model.path``, or the embedded tiny MoE's cached cold start
   (:func:`pgzoo.models.cold_start.ensure_cold_start`); with ``--resume`` the newest checkpoint of the run folder;
3. held-out evaluation before training (:func:`pgzoo.models.evaluate.evaluate`: greedy accuracy, avg@k, pass@k);
4. the rollout engine (vLLM or transformers) loaded from the same checkpoint, the objective, the LightningModule
   (:class:`pgzoo.adapters.lightning.module.RLModule`) and a Lightning ``Trainer`` whose strategy, devices and nodes come
   from ``train.strategy / devices / num_nodes`` (:mod:`pgzoo.adapters.lightning.distributed`): Lightning starts the other ranks
   (``devices > 1`` on one machine) or joins the ones ``torchrun`` / SLURM started;
5. ``trainer.fit`` over the global steps; then evaluation after training, PNG plots and a summary table.

The run folder's files are :mod:`pgzoo.adapters.lightning.run_folder`'s. Resume is exact on CPU with a fixed seed: every step's prompts
and sampling seed are functions of (recipe seed, step), and the optimizer/RNG state comes back from the checkpoint.

Failures keep work: checkpoints are written atomically, so the engine dying or a rank being killed mid-run leaves the
last one intact and the error says how to continue (``--resume``); a reward function that raises names the sample.
This module imports no Lightning at import time.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any

from pgzoo.adapters.lightning.run_folder import TrainResult
from pgzoo.errors import ConfigError, require


# ---------------------------------------------------------------------- pieces (tests monkeypatch these)
def build_engine(recipe, model_path: Path):
    """The rollout engine of ``recipe.rollout``, loaded from ``model_path``: the builder registered under
    ``rollout.engine`` in ``pgzoo.rollout.builders.engines`` (see pgzoo/rollout/builders.py)."""
    require("pgzoo.rollout", "hf")
    from pgzoo.rollout.builders import engines

    return engines.build(recipe.rollout.engine, recipe.rollout, model_path, seed=recipe.seed,
                         return_routes=recipe.train.routing_replay == "R3", world_size=recipe.world_size)


def resolve_model_path(recipe, task, say=None) -> Path:
    """``model.path`` or the cached cold start of the embedded tiny MoE for the recipe's task, seeded by
    ``model.cold_start.seed`` (default 0 for every run seed; ``run``: the run's seed) (``say`` hears that a cold start
    is being trained, and its progress)."""
    if recipe.model.path is not None:
        return Path(os.path.expanduser(recipe.model.path))
    from pgzoo.models.cold_start import ensure_cold_start, recipe_cold_start

    seed, sft_options = recipe_cold_start(recipe.model.cold_start, recipe.seed)  # one shared cold start by default
    return Path(ensure_cold_start(recipe.task.name, dict(recipe.task.options), seed=seed, log=say, **sft_options))


def load_policy(path: Path, dtype: str):
    torch = require("torch", "hf")
    transformers = require("transformers", "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype))
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    tok.padding_side = "left"
    return model.eval(), tok


def eval_problems(recipe, task, say=None) -> dict[str, list]:
    """Benchmark name -> problems: distinct problems of the task's held-out split (all of it, once, when it holds
    fewer than ``eval.num_problems``; ``say`` is told), or the user's files (``eval.files``)."""
    if not recipe.eval.files:
        from pgzoo.models.evaluate import heldout_problems

        return {"heldout": heldout_problems(task, recipe.eval.num_problems, split="test", seed=recipe.seed + 12345,
                                            say=say)}
    import pgzoo.tasks

    out = {}
    base = {k: v for k, v in recipe.task.options.items() if k not in ("path",)}
    for name, path in recipe.eval.files.items():
        t = pgzoo.tasks.get("math", path=path, **base)
        out[name] = [p for split in ("train", "test") for p in t.splits[split]]
    return out


def run_eval(recipe, policy, tokenizer, task, problems: dict[str, list]) -> dict[str, float]:
    from pgzoo.models.evaluate import evaluate

    e = recipe.eval
    out: dict[str, float] = {}
    for name, probs in problems.items():
        res = evaluate(policy, tokenizer, task, probs, k=e.k, temperature=e.temperature,
                       max_new_tokens=e.max_new_tokens or recipe.rollout.max_new_tokens)
        prefix = "" if name == "heldout" else f"{name}/"
        out.update({f"{prefix}{k}": float(v) for k, v in res.items() if isinstance(v, (int, float))})
    return out


# ---------------------------------------------------------------------- the run
def train(recipe, *, resume: bool = False, quiet: bool = False, command: str | None = None,
          allow_change: tuple[str, ...] | list[str] = ()) -> TrainResult | None:
    """Run ``recipe`` end to end (see the module runbook); returns a :class:`TrainResult` on rank 0, None on the
    other ranks. With ``train.devices > 1`` and no launcher around (no torchrun/SLURM), Lightning re-runs the
    command line once per extra rank when training starts: call this from ``pgzoo train`` or a script guarded by
    ``if __name__ == "__main__":``. ``command`` is how the user started the run (for the ``--resume`` hint);
    ``allow_change`` the recipe keys a resumed run may change (:mod:`pgzoo.recipes.diff`).

    Ctrl-C or SIGTERM reaching any rank stop every rank after the same step with a final checkpoint and raise
    :class:`pgzoo.adapters.lightning.signals.Interrupted` (exit 130 / 143 from the CLI); a diverged step raises
    :class:`pgzoo.adapters.lightning.guards.Diverged` (``train.stop_on``)."""
    from pgzoo.adapters.lightning import resume as resume_mod
    from pgzoo.adapters.lightning import run_folder as rf
    from pgzoo.adapters.lightning.distributed import check_launcher, env_rank

    t_start = time.perf_counter()
    _quiet_frameworks()
    # 1. recipe: types and combinations were checked on load; now this machine and the user-supplied paths
    recipe.check_environment()
    check_launcher(recipe.train.num_nodes)  # several machines without a launcher would wait, silently, for none
    lead = env_rank() == 0  # rank 0 alone evaluates, logs, plots and summarises
    say = (lambda *a: None) if (quiet or not lead) else (lambda *a: print(*a, flush=True))
    recipe.check_files()
    run_dir = recipe.run_dir
    _set_threads(recipe)  # before anything heavy: torch's thread pool is sized once
    if lead:
        resume_mod.prepare_run_dir(run_dir)
    with rf.recorded_status(run_dir, enabled=lead):  # status.json: running, then finished / stopped / failed
        return _run(recipe, run_dir, lead, say, resume, quiet, command, allow_change, t_start)


def _run(recipe, run_dir: Path, lead: bool, say, resume: bool, quiet: bool, command: str | None, allow_change,
         t_start: float) -> TrainResult | None:
    """Steps 2–6 of the runbook, in a run folder that exists (rank 0 made it)."""
    torch = require("torch", "hf")
    import pgzoo
    import pgzoo.tasks
    from pgzoo.adapters.lightning import resume as resume_mod
    from pgzoo.adapters.lightning import run_folder as rf
    from pgzoo.adapters.lightning.distributed import rendezvous_notice
    from pgzoo.adapters.lightning.signals import GracefulStop, fit_until_stopped

    ckpt = resume_mod.starting_checkpoint(run_dir, resume, say, lead=lead)  # intact, or None (a new run)
    state = resume_mod.load_state(ckpt) if ckpt is not None else None
    changed = resume_mod.check_recipe(state, recipe, allow_change, ckpt=ckpt) if state is not None else []
    start = int(state["step"]) + 1 if state is not None else 0
    _one_device_per_rank(recipe)
    loggers: list = []
    if lead:
        written = resume_mod.write_recipe(run_dir, recipe, resume_step=start if ckpt is not None else None)
        if changed:
            say(f"pgzoo: resuming with {', '.join(changed)} changed (--allow-change); this recipe is in {written}")
        loggers = rf.loggers(recipe, run_dir, resume_mod.kept_rows(state, run_dir, start))  # fails fast on a
        # missing logger package; metrics.csv holds every step up to the checkpoint again
    # 2. task and policy
    torch.manual_seed(recipe.seed)
    task = pgzoo.tasks.get(recipe.task.name, **recipe.task.options)
    base_path = resolve_model_path(recipe, task, say)  # say is silent on ranks other than 0
    policy_path = ckpt or base_path
    if recipe.model.lora is None:
        if ckpt is not None and (ckpt / "adapter").is_dir():
            raise ConfigError(f"{ckpt} holds a LoRA adapter: resume it with the run's model.lora section")
        policy, tokenizer = load_policy(policy_path, recipe.model.dtype)
    else:  # LoRA: the base weights, fresh adapters or (--resume) the checkpoint's (pgzoo.adapters.lightning.lora)
        from pgzoo.adapters.lightning.lora import load_lora_policy

        policy, tokenizer = load_lora_policy(recipe.model.lora, base_path, ckpt, recipe.model.dtype, load_policy)
    # 3. evaluation before training (skipped on resume: it was recorded in eval.json)
    evaluating = recipe.eval.before or recipe.eval.after or recipe.eval.every
    problems = eval_problems(recipe, task, say) if evaluating else {}
    evals = rf.read_eval(run_dir) if ckpt is not None else {}
    if lead and recipe.eval.before and "before" not in evals:
        say(f"pgzoo: evaluating the starting policy on {sum(map(len, problems.values()))} held-out problems ...")
        evals["before"] = run_eval(recipe, policy, tokenizer, task, problems)
        rf.write_eval(run_dir, evals)
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
    _set_threads(recipe)  # an engine may resize torch's pool while it starts (vLLM CPU does)
    stop = GracefulStop(lead=lead)
    module, trainer = _module_and_trainer(recipe, policy, tokenizer, objective, task, engine, ref_policy, run_dir,
                                          ckpt, loggers if lead else False, lead, quiet, evals, problems, stop)
    module.lora_base = str(base_path)  # recorded in LoRA checkpoints, checked on --resume
    if ckpt is not None:
        say(f"pgzoo: resuming from {ckpt} at step {start}")
    if recipe.world_size > 1:
        say(f"pgzoo: {recipe.strategy} over {recipe.world_size} ranks ({recipe.train.devices} per node x "
            f"{recipe.train.num_nodes} node(s)); rank 0 logs")
    # 5. the global steps (a signal on any rank: all stop after the same step, checkpointed; pgzoo.adapters.lightning.signals)
    from pgzoo.adapters.lightning.loop_data import step_loader

    with warnings.catch_warnings(), stop:
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers|exists and is not "
                                          "empty|LightningModule.optimizers|`training_step` returned).*")
        warnings.filterwarnings("ignore", category=UserWarning, module="lightning")
        warnings.filterwarnings("ignore", message=".*treespec.*")
        try:
            if start < recipe.train.steps:
                with rendezvous_notice(recipe.world_size, recipe.train.num_nodes, recipe.train.dist_timeout):
                    fit_until_stopped(trainer, module, step_loader(start, recipe.train.steps), stop, run_dir,
                                      recipe.world_size, recipe.train.steps, command)
        finally:
            module.stop_rollouts()  # asynchronous runs: the background generation ends before its engine closes
            _close(engine)
    rf.finalize_loggers(trainer)
    if not lead:
        if stop.signum is not None:  # the same status as rank 0, after it (Lightning's launcher watches us)
            stop.finish_rank()
            raise stop.error(module.last_step, recipe.train.steps, run_dir, command)
        return None
    # 6. evaluation after training (a sharded policy: from the consolidated final checkpoint), plots, summary
    final = rf.latest_checkpoint(run_dir)
    if recipe.eval.after and "after" not in evals and stop.signum is None:
        say("pgzoo: evaluating the trained policy ...")
        from pgzoo.adapters.lightning.distributed import is_sharded

        after = load_policy(final, recipe.model.dtype)[0] if is_sharded(module.policy) else module.policy
        evals["after"] = run_eval(recipe, after, tokenizer, task, problems)
        rf.write_eval(run_dir, evals)
    history = module.history or list((state or {}).get("history", []))  # the checkpoint's, when no step ran
    if recipe.output.plots:
        rf.plot_run(run_dir, history)
    result = TrainResult(run_dir, evals.get("before"), evals.get("after"), history,
                         time.perf_counter() - t_start, final)
    summary = rf.summary_dict(recipe, result)
    summary.update(strategy=recipe.strategy, world_size=recipe.world_size)
    if stop.signum is not None:
        summary["interrupted"] = stop.name
    rf.write_summary(run_dir, summary)
    if not quiet:
        rf.print_summary(recipe, result)
    if stop.signum is not None:
        raise stop.error(module.last_step, recipe.train.steps, run_dir, command)
    return result


def _module_and_trainer(recipe, policy, tokenizer, objective, task, engine, ref_policy, run_dir, ckpt, loggers,
                        lead, quiet, evals, problems, stop=None):
    """The RLModule and a Lightning Trainer with the recipe's parallelism, checkpoints, evaluation and progress bar."""
    L = require("lightning", "lightning")
    from pgzoo.adapters.lightning.checkpoint import HFCheckpoint
    from pgzoo.adapters.lightning.distributed import trainer_parallelism
    from pgzoo.adapters.lightning.module import RLModule

    module = RLModule(policy, tokenizer, objective, task, engine, recipe, ref_policy)
    callbacks: list[Any] = []
    if ckpt is not None:
        callbacks.append(_Restore(ckpt))
    callbacks.append(HFCheckpoint(run_dir, every=recipe.output.checkpoint_every,
                                             keep=recipe.output.keep_checkpoints, total_steps=recipe.train.steps,
                                             stop=stop))
    if recipe.eval.every:
        callbacks.append(_PeriodicEval(recipe, tokenizer, task, problems, run_dir, evals, lead))
    bar = recipe.output.progress_bar and not quiet and lead
    if bar:
        callbacks.append(L.pytorch.callbacks.TQDMProgressBar(refresh_rate=1))
    trainer = L.Trainer(**trainer_parallelism(recipe), max_epochs=1, logger=loggers, callbacks=callbacks,
                        enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                        log_every_n_steps=1, enable_progress_bar=bar, use_distributed_sampler=False,
                        deterministic=False)
    return module, trainer


def _one_device_per_rank(recipe) -> None:
    """Before anything touches a device: on CUDA this rank's GPU is ``LOCAL_RANK`` (the engine is built before
    Lightning sets it)."""
    import torch

    if recipe.world_size > 1 and torch.cuda.is_available():
        local = os.environ.get("LOCAL_RANK") or os.environ.get("SLURM_LOCALID") or "0"  # torchrun/Lightning, SLURM
        torch.cuda.set_device(int(local))


def _set_threads(recipe) -> None:
    """``train.threads`` torch intra-op threads in this process (null: leave torch's default). One per process is
    the default because OpenMP threads spin-wait on each other: beside any other busy process on the same cores a
    step with as many threads as cores becomes many times slower, one thread does not (benchmarks/threads.py)."""
    import torch

    if recipe.train.threads is not None and torch.get_num_threads() != recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)


def _Restore(ckpt):
    """Optimizer state is loaded after Lightning builds (and FSDP shards) the optimizers: on_train_start."""
    L = require("lightning", "lightning")
    from pgzoo.adapters.lightning.checkpoint import load_trainer_state

    class Restore(L.Callback):
        def on_train_start(self, trainer, module):
            load_trainer_state(module, ckpt)

    return Restore()


def _PeriodicEval(recipe, tokenizer, task, problems, run_dir, evals, lead):
    """Rank 0 evaluates every ``eval.every`` steps. A sharded policy is gathered first (every rank takes part) into
    an unsharded copy on rank 0, built once from the policy's config."""
    L = require("lightning", "lightning")
    from pgzoo.adapters.lightning import run_folder as rf
    from pgzoo.adapters.lightning.lora import effective_state_dict
    from pgzoo.adapters.lightning.distributed import is_sharded

    class PeriodicEval(L.Callback):
        copy = None

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            step = int(batch)
            if (step + 1) % recipe.eval.every or step + 1 >= recipe.train.steps:
                return
            policy = module.policy
            if is_sharded(policy):
                state = effective_state_dict(policy)  # collective: the full (LoRA: merged) tensors on rank 0
                if lead:
                    policy = self.unsharded_copy(module, state)
            if not lead:
                return
            res = run_eval(recipe, policy, tokenizer, task, problems)
            evals.setdefault("during", {})[str(step + 1)] = res
            rf.write_eval(run_dir, evals)
            for lg in module.loggers:
                lg.log_metrics({f"eval/{k}": v for k, v in res.items()}, step=step)

        def unsharded_copy(self, module, state):
            import transformers

            if self.copy is None:
                self.copy = transformers.AutoModelForCausalLM.from_config(module.policy.config).to(module.device)
            self.copy.load_state_dict(state)
            return self.copy.eval()

    return PeriodicEval()


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


def _close(engine) -> None:
    close = getattr(engine, "close", None)
    if close is not None:
        try:
            close()
        except Exception:  # pragma: no cover
            pass
