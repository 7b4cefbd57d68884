"""Recipes: a typed schema that maps one-to-one onto the YAML files in ``recipes/`` (torchtune-style).

    recipe = load_recipe("recipes/tiny/minirl.yaml", ["train.lr=3e-4", "rollout.group_size=8"])
    recipe.train.num_minibatches, recipe.rollout.engine, recipe.dump()

A recipe file is exactly :class:`Recipe` written as YAML: every section is a key, every field a sub-key.
Unknown keys are rejected with the nearest valid key; wrong types name the dotted key; combinations that cannot run
(R3 with an engine that does not declare routes, N not dividing the batch, MiniRL without the inference engine's
logprobs, ...) are rejected by :meth:`Recipe.check` with the fix. Command-line overrides are ``dotted.key=value``
(the value is parsed as YAML: ``3e-4``, ``true``, ``null``, ``[a, b]``).

Sizes (the paper's notation): B = ``rollout.prompts_per_step`` prompts per global step, G = ``rollout.group_size``
responses each, so B·G responses per step, split into N = ``train.num_minibatches`` mini-batches of B·G/N responses,
one optimizer step each (N = 1 is on-policy; N > 1 is off-policy: mini-batch n is n updates stale).

The sections (one typed class per key) are in :mod:`pgzoo.recipes.sections`; loading files and overrides in
:mod:`pgzoo.recipes.load`; the recipes shipped with pgzoo, which a recipe argument that is not a file names
(``tiny/minirl``), in :mod:`pgzoo.recipes.catalog`; ``pgzoo recipe validate | list | cp`` in :mod:`pgzoo.cli.recipe`.
"""

from __future__ import annotations

import os
from pathlib import Path

from collections.abc import Callable
from typing import TYPE_CHECKING

from pgzoo.errors import ConfigError, require, suggest
from pgzoo.recipes.sections import (EvalSection, ModelSection, ObjectiveSection, OutputSection, RolloutSection,
                                    Section, TaskSection, TrainSection)

if TYPE_CHECKING:
    from pgzoo.rollout.capabilities import EngineCapabilities

pydantic = require("pydantic", "lightning")
Field = pydantic.Field


class Recipe(Section):
    """A whole run. Each section is a YAML key; see the section classes for the fields."""

    name: str = Field("run", description="run name (used in output.dir)")
    description: str = ""
    seed: int = 0
    model: ModelSection = Field(default_factory=ModelSection)
    task: TaskSection = Field(default_factory=TaskSection)
    objective: ObjectiveSection = Field(default_factory=ObjectiveSection)
    rollout: RolloutSection = Field(default_factory=RolloutSection)
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    output: OutputSection = Field(default_factory=OutputSection)

    # ------------------------------------------------------------------ derived sizes
    @property
    def responses_per_step(self) -> int:
        return self.rollout.prompts_per_step * self.rollout.group_size

    @property
    def minibatch_size(self) -> int:
        return self.responses_per_step // self.train.num_minibatches

    @property
    def needs_old_logprobs(self) -> bool:
        """π_θold from the training engine is needed off-policy (N > 1) and for R2 (its routes are recorded there).

        Asynchronously (rollout.max_staleness >= 1) π_θold is by default the policy being updated, θ_s, not the one
        that sampled the rows (that one is μ, the engine's logprobs): with one mini-batch the update's own forward
        runs under θ_s, so π_θold = π_θ detached there, exactly as in the synchronous on-policy step, and a separate
        pass would recompute the same numbers. With ``train.old_policy: sampling`` (:attr:`scores_ahead`) rows
        sampled ahead bring their π_θold with them, computed under the weights that sampled them; this pass then
        runs only for a step sampled with the current weights."""
        return self.train.num_minibatches > 1 or self.train.routing_replay == "R2"

    @property
    def scores_ahead(self) -> bool:
        """Asynchronous with ``train.old_policy: sampling``: the rows a version samples ahead get their π_θold (and
        R2 routes) from the training engine under that version's weights, before its first optimizer step."""
        return self.rollout.max_staleness >= 1 and self.train.old_policy == "sampling"

    @property
    def world_size(self) -> int:
        """Ranks of a run: ``train.devices x train.num_nodes``."""
        return self.train.devices * self.train.num_nodes

    @property
    def strategy(self) -> str:
        """The resolved ``train.strategy``: 'single' (one process), 'ddp' or 'fsdp'."""
        s = self.train.strategy
        if s == "auto":
            return "ddp" if self.world_size > 1 else "single"
        return s

    @property
    def run_dir(self) -> Path:
        return Path(self.output.dir.replace("{name}", self.name))

    # ------------------------------------------------------------------ cross-field checks
    def check(self) -> "Recipe":
        """Reject combinations that cannot run; every message names the keys and the fix. Returns self."""
        r, t = self.rollout, self.train
        if self.responses_per_step % t.num_minibatches:
            raise ConfigError(
                f"train.num_minibatches={t.num_minibatches} does not divide the {self.responses_per_step} responses "
                f"per step (rollout.prompts_per_step={r.prompts_per_step} x rollout.group_size={r.group_size}); "
                f"pick N among {_divisors(self.responses_per_step)}")
        mb, world = self.minibatch_size, self.world_size
        ranks = f"train.devices={t.devices}" + (f" x train.num_nodes={t.num_nodes}" if t.num_nodes > 1 else "")
        if r.prompts_per_step % world:
            raise ConfigError(f"{ranks} ranks do not divide rollout.prompts_per_step={r.prompts_per_step} (prompts "
                              f"are sharded whole over ranks); pick prompts_per_step as a multiple of {world}")
        if t.micro_batch_size is not None and mb % (t.micro_batch_size * world):
            raise ConfigError(
                f"train.micro_batch_size={t.micro_batch_size} x {ranks} ranks does not divide the "
                f"mini-batch of {mb} responses; pick micro_batch_size among "
                f"{[d for d in _divisors(mb) if mb % (d * world) == 0]}")
        if mb % world:
            raise ConfigError(f"{ranks} ranks do not divide the mini-batch of {mb} responses")
        if t.mixed_precision and self.strategy != "fsdp":
            raise ConfigError("train.mixed_precision=true is an FSDP option (bfloat16 compute, float32 reduction); "
                              "set train.strategy=fsdp, or model.dtype=bfloat16 for plain bfloat16 training")
        if t.activation_checkpointing and self.strategy != "fsdp":
            raise ConfigError("train.activation_checkpointing=true is applied per decoder layer by the fsdp strategy; "
                              "set train.strategy=fsdp")
        if r.overlong_buffer is not None and r.overlong_buffer.len > r.max_new_tokens:
            raise ConfigError(f"rollout.overlong_buffer.len={r.overlong_buffer.len} is longer than "
                              f"rollout.max_new_tokens={r.max_new_tokens}: the penalty ramps over the last len tokens "
                              f"before max_new_tokens; set len <= {r.max_new_tokens} (the paper: a fifth of it)")
        if r.max_staleness and r.dynamic_sampling is not None:
            raise ConfigError(
                f"rollout.max_staleness={r.max_staleness} with rollout.dynamic_sampling: further draws are decided on "
                "the whole step's rewards, gathered across ranks, and a collective cannot run in the background "
                "generation thread beside the trainer's; set rollout.dynamic_sampling=null or rollout.max_staleness=0")
        if r.group_size < 2:
            raise ConfigError("rollout.group_size must be >= 2: group-relative advantages of a group of one are 0, "
                              "so nothing would be learned")
        self._check_engine()
        if self.eval.files and self.eval.k < 1:
            raise ConfigError("eval.k must be >= 1")
        self._check_objective()
        return self

    def _check_engine(self) -> None:
        """The rollout settings against what ``rollout.engine`` declares (its EngineCapabilities; no engine starts).
        Device-dependent abilities (vLLM's routes need CUDA) are checked in :meth:`check_environment`."""
        from pgzoo.rollout.builders import capabilities_of  # lazily, like RolloutSection: the engines import torch

        r, t = self.rollout, self.train
        caps = capabilities_of(r.engine)
        if r.dtype not in caps.dtypes:
            raise _unsupported(f"rollout.dtype={r.dtype}", f"{r.dtype} rollouts", r.engine, caps, "dtypes",
                               lambda c: r.dtype in c.dtypes, f"rollout.dtype={caps.dtypes[0]}")
        if r.fp8 and not caps.fp8:
            raise _unsupported("rollout.fp8=true", "FP8 rollout weights", r.engine, caps, "fp8",
                               lambda c: c.fp8 and r.dtype in c.fp8_dtypes, "rollout.fp8=false")
        if r.fp8 and r.dtype not in caps.fp8_dtypes:
            raise _unsupported(f"rollout.fp8=true with rollout.dtype={r.dtype}",
                               f"FP8 rollouts in {r.dtype} (only in {', '.join(caps.fp8_dtypes)})", r.engine, caps,
                               "fp8_dtypes", lambda c: c.fp8 and r.dtype in c.fp8_dtypes,
                               f"rollout.dtype={caps.fp8_dtypes[0]}")
        if r.router_dtype is not None and not caps.router_dtype:
            raise _unsupported(f"rollout.router_dtype={r.router_dtype}", "a separate dtype for the MoE routers",
                               r.engine, caps, "router_dtype", lambda c: c.router_dtype, "rollout.router_dtype=null")
        if t.routing_replay == "R3" and not caps.routes:
            raise _unsupported("train.routing_replay=R3 needs the rollout engine's routes", "routes", r.engine, caps,
                               "routes", lambda c: c.routes, "train.routing_replay=R2")
        if self.model.lora is not None and not caps.lora_sync:
            raise _unsupported("model.lora", "syncing a LoRA policy (its effective weights)", r.engine, caps,
                               "lora_sync", lambda c: c.lora_sync, "model.lora=null")
        if r.max_staleness and not caps.background_generate:
            raise _unsupported(f"rollout.max_staleness={r.max_staleness}",
                               "generation in a background thread while the trainer updates", r.engine, caps,
                               "background_generate", lambda c: c.background_generate, "rollout.max_staleness=0")
        if r.device is not None:
            from pgzoo.rollout.builders import engine_device

            engine_device(r.device, 0)  # the format, before anything starts
            if self.world_size > 1 and "{local_rank" not in r.device:
                raise ConfigError(f"rollout.device={r.device}: every one of the {self.world_size} ranks builds its own "
                                  "engine and would put it on this one device; give each its own with {local_rank} "
                                  "or {local_rank+N}, e.g. rollout.device='cuda:{local_rank+8}'")
            self._check_engine_gpus(engine_device)
        if r.device is not None and not caps.device_choice:
            raise _unsupported(f"rollout.device={r.device}", "a device of its own", r.engine, caps, "device_choice",
                               lambda c: c.device_choice, "rollout.device=null")
        if r.weight_transfer is not None and r.weight_transfer not in caps.weight_transfer:
            raise _unsupported(f"rollout.weight_transfer={r.weight_transfer}",
                               f"syncs through vLLM's weight-transfer API ({r.weight_transfer})", r.engine, caps,
                               "weight_transfer", lambda c: r.weight_transfer in c.weight_transfer,
                               "rollout.weight_transfer=null")
        if self.strategy == "fsdp" and not caps.sharded_sync:
            raise _unsupported("train.strategy=fsdp", "syncing a sharded policy (load_weight_buckets)", r.engine,
                               caps, "sharded_sync", lambda c: c.sharded_sync, "train.strategy=ddp")

    def _check_engine_gpus(self, engine_device) -> None:
        """Ranks train on ``cuda:0 .. cuda:train.devices-1`` of their machine (Lightning's device for a local rank):
        an engine that ``rollout.device`` puts on another rank's training GPU takes that rank's memory and kernels
        (its own rank's GPU is the shared-device case: warned asynchronously, refused with NCCL weight transfer)."""
        import re

        devices = self.train.devices
        for rank in range(devices):
            placed = engine_device(self.rollout.device, rank)
            hit = re.fullmatch(r"cuda:(\d+)", placed or "")
            if hit and int(hit[1]) < devices and int(hit[1]) != rank:
                raise ConfigError(
                    f"rollout.device={self.rollout.device}: rank {rank}'s engine would sample on {placed}, where rank "
                    f"{hit[1]} trains (train.devices={devices}: the ranks of a machine train on cuda:0..cuda:"
                    f"{devices - 1}); put the engines after them, e.g. rollout.device='cuda:{{local_rank+{devices}}}'")

    def _check_objective(self) -> None:
        from pgzoo.errors import PgzooError
        from pgzoo.objectives import registry as objectives

        try:
            obj = objectives.get(self.objective.name, **self.objective.options)
        except PgzooError as exc:
            key = "objective.name" if "unknown objective" in str(exc) else "objective.options"
            raise ConfigError(f"{key}: {exc}") from None
        if "rollout_logprobs" in obj.requires and self.rollout.logprobs != "engine":
            raise ConfigError(
                f"objective {obj.name!r} requires the inference engine's logprobs (μ, its train-inference IS weight) "
                "but rollout.logprobs=none; set rollout.logprobs=engine or pick an objective without that factor "
                "(e.g. minirl-no-is)")
        from pgzoo import advantages

        name = self.objective.advantage or obj.default_advantage
        key, known = advantages.registry.canonical(name), advantages.available()
        if key not in known:
            raise ConfigError(f"objective.advantage={name!r} is not an estimator in "
                              f"pgzoo.advantages.{suggest(name, known)} Available: {', '.join(known)}")
        runnable = advantages.trainer_estimators()
        if key not in runnable:
            inputs = ", ".join(getattr(advantages.registry.get(key), "inputs", ()))
            raise ConfigError(f"objective.advantage={name!r} needs inputs pgzoo's trainer does not produce when it "
                              f"computes advantages ({inputs}); pick one of {', '.join(runnable)}")
        # the options' names and values, checked by the estimator itself on a batch of the recipe's groups (zero
        # rewards, one token each)
        import torch

        rows = 2 * self.rollout.group_size
        try:
            advantages.compute(key, torch.zeros(rows), group_size=self.rollout.group_size,
                               response_mask=torch.ones(rows, 1), **self.objective.advantage_options)
        except ConfigError as exc:
            raise ConfigError(f"objective.advantage_options: {exc}") from None

    def check_environment(self) -> "Recipe":
        """Reject what this machine cannot run (called by `pgzoo train`, including --dry-run; `pgzoo recipe validate`
        checks the file only, so paper recipes validate anywhere)."""
        r, t = self.rollout, self.train
        from pgzoo.rollout.builders import capabilities_of

        caps = capabilities_of(r.engine)
        if r.fp8 and not caps.fp8_here():
            raise _unsupported("rollout.fp8=true", "FP8 rollouts on this machine (no CUDA)", r.engine, caps, "fp8",
                               lambda c: c.fp8_here() and r.dtype in c.fp8_dtypes, "rollout.fp8=false")
        if t.routing_replay == "R3" and not caps.routes_here():
            raise _unsupported("train.routing_replay=R3 needs the rollout engine's routes",
                               "routes on this machine (no CUDA)", r.engine, caps, "routes",
                               lambda c: c.routes_here(), "train.routing_replay=R2")
        if r.weight_transfer is not None and not _has_cuda():
            raise ConfigError(f"rollout.weight_transfer={r.weight_transfer}: vLLM's weight transfer broadcasts CUDA "
                              "tensors over NCCL and this machine has no CUDA device; set rollout.weight_transfer=null "
                              "(the engine's default sync)")
        if t.devices > 1 and not _has_cuda() and t.devices > (os.cpu_count() or 1):
            raise ConfigError(f"train.devices={t.devices} CPU processes on a machine with {os.cpu_count()} cores; "
                              "use train.devices=1 (or 2 for a gloo DDP check)")
        if t.mixed_precision and not _has_cuda():
            raise ConfigError("train.mixed_precision=true needs CUDA (bfloat16 FSDP compute); on CPU leave it false")
        return self

    def check_files(self) -> "Recipe":
        """Check that user-supplied paths exist (run by `pgzoo train` before anything heavy)."""
        if self.model.path is not None:
            from pgzoo.fileio import check_model_folder

            check_model_folder(self.model.path, "model.path")
        for name, path in self.eval.files.items():
            if not Path(os.path.expanduser(path)).exists():
                raise ConfigError(f"eval.files.{name}={path!r} does not exist; pass it with eval.files.{name}=/path")
        for key, value in self.task.options.items():
            if key.endswith(("path", "file")) and isinstance(value, str) and not Path(value).exists():
                raise ConfigError(f"task.options.{key}={value!r} does not exist; pass it with "
                                  f"task.options.{key}=/path")
        return self

    def dump(self) -> str:
        """The resolved recipe as YAML (loads back to an equal Recipe)."""
        yaml = require("yaml", "lightning")
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def plan(self) -> str:
        """A human-readable summary of what one run does."""
        r, t = self.rollout, self.train
        old = ("yes (" + ", ".join(x for x in (("off-policy N>1" if t.num_minibatches > 1 else ""),
                                                ("records R2 routes" if t.routing_replay == "R2" else "")) if x) + ")"
               if self.needs_old_logprobs else "no (one mini-batch: π_θold = π_θ detached)")
        if r.max_staleness:
            old += (f"; asynchronous: rows up to {r.max_staleness} versions old, "
                    + ("μ = the engine's logprobs of the sampling version" if r.logprobs == "engine"
                       else "no μ (rollout.logprobs=none): staleness is not corrected")
                    + ("; π_θold = the training engine under the sampling version (train.old_policy=sampling)"
                       if t.old_policy == "sampling" else "; π_θold = the current weights (decoupled)"))
        lines = [
            f"recipe        {self.name}: {self.description}".rstrip(": "),
            f"model         {self.model.path or 'embedded tiny MoE, cached cold start'} (train {self.model.dtype})"
            f"{'' if self.model.lora is None else f', LoRA r={self.model.lora.r} alpha={self.model.lora.alpha:g}'}",
            f"task          {self.task.name} {self.task.options or ''}".rstrip(),
            f"objective     {self.objective.name} {self.objective.options or ''} advantage="
            f"{self.objective.advantage or 'objective default'} {self.objective.advantage_options or ''}".rstrip(),
            f"rollout       {r.engine} ({r.dtype}{', fp8' if r.fp8 else ''}"
            f"{f', router {r.router_dtype}' if r.router_dtype else ''}), B={r.prompts_per_step} prompts x "
            f"G={r.group_size} = {self.responses_per_step} responses/step, <= {r.max_new_tokens} new tokens, "
            f"T={r.temperature}, μ logprobs: {r.logprobs}"
            f"{'' if r.verify_sync is None else f', sync checked (mean |Δ log p| <= {r.verify_sync:g})'}"
            f"{'' if r.dynamic_sampling is None else f', dynamic sampling (<= {r.dynamic_sampling.max_draws} draws)'}"
            f"{'' if r.overlong_buffer is None else f', overlong penalty over the last {r.overlong_buffer.len} tokens'}"
            f"{'' if not r.max_staleness else f', asynchronous (max_staleness={r.max_staleness})'}"
            f"{'' if r.device is None else f', engine on {r.device}'}",
            f"updates       N={t.num_minibatches} optimizer step(s)/step of {self.minibatch_size} responses"
            f"{'' if t.micro_batch_size is None else f' in micro-batches of {t.micro_batch_size}'}"
            f", lr={t.lr:g}, grad_clip={t.grad_clip}"
            f"{', truncated completions masked' if t.mask_truncated_completions else ''}",
            f"parallelism   {self.strategy}, {t.devices} device(s) x {t.num_nodes} node(s) = {self.world_size} "
            f"rank(s){', activation checkpointing' if t.activation_checkpointing else ''}"
            f"{', bf16 mixed precision' if t.mixed_precision else ''}",
            f"old logprobs  {old}",
            f"routing       {t.routing_replay or 'no replay'}",
            f"steps         {t.steps} global steps = {t.steps * t.num_minibatches} optimizer steps, "
            f"{t.steps * self.responses_per_step} responses",
            f"eval          {'before ' if self.eval.before else ''}{'after ' if self.eval.after else ''}"
            f"{f'every {self.eval.every} ' if self.eval.every else ''}on "
            f"{', '.join(self.eval.files) if self.eval.files else f'{self.eval.num_problems} held-out problems'}, "
            f"k={self.eval.k}",
            f"output        {self.run_dir} (checkpoint every {self.output.checkpoint_every or 'end'}, "
            f"loggers {', '.join(self.output.loggers)})",
        ]
        return "\n".join(lines)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


def _unsupported(setting: str, what: str, engine: str, caps: "EngineCapabilities", field: str,
                 can: Callable[["EngineCapabilities"], bool], fallback: str) -> ConfigError:
    """``setting``: rollout.engine=``engine`` does not declare ``what`` (with the engine's declared reason), the
    registered engines that do (``can``), and the fix: one of those engines or ``fallback``."""
    from pgzoo.rollout.builders import engines_that

    why = caps.note(field)
    others = [name for name in engines_that(can) if name != engine]
    which = f"engines that do: {', '.join(others)}" if others else "no registered engine does"
    fixes = [f"rollout.engine={name}" for name in others[:2]] + [fallback]
    return ConfigError(f"{setting}: rollout.engine={engine} does not declare {what} (EngineCapabilities.{field}"
                       f"{f': {why}' if why else ''}); {which}; set {' or '.join(fixes)}")
