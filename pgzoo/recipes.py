"""Recipes: a typed schema that maps one-to-one onto the YAML files in ``recipes/`` (torchtune-style).

    recipe = load_recipe("recipes/tiny/minirl.yaml", ["train.lr=3e-4", "rollout.group_size=8"])
    recipe.train.num_minibatches, recipe.rollout.engine, recipe.dump()

A recipe file is exactly :class:`Recipe` written as YAML: every section below is a key, every field a sub-key.
Unknown keys are rejected with the nearest valid key; wrong types name the dotted key; combinations that cannot run
(R3 with an engine that cannot return routes, N not dividing the batch, MiniRL without the inference engine's
logprobs, ...) are rejected by :meth:`Recipe.check` with the fix. Command-line overrides are ``dotted.key=value``
(the value is parsed as YAML: ``3e-4``, ``true``, ``null``, ``[a, b]``).

Sizes (the paper's notation): B = ``rollout.prompts_per_step`` prompts per global step, G = ``rollout.group_size``
responses each, so B·G responses per step, split into N = ``train.num_minibatches`` mini-batches of B·G/N responses,
one optimizer step each (N = 1 is on-policy; N > 1 is off-policy: mini-batch n is n updates stale).

The recipes in ``recipes/`` ship inside the package (``pgzoo.recipe_files``): a recipe argument that is not a file
names one (``tiny/minirl``, ``recipes/tiny/minirl.yaml``; :func:`find_recipe`), ``pgzoo recipe list`` lists them and
``pgzoo recipe cp NAME FILE`` copies one to edit.

``pgzoo recipe validate RECIPE...`` checks files without loading any model (paths need not exist: file checks run
when training starts, or here with ``--check-files``); ``pgzoo train RECIPE --dry-run`` prints the same plan.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Literal

from pgzoo.errors import ConfigError, require, suggest
from pgzoo.recipe_yaml import load_yaml

_pydantic = require("pydantic", "lightning")
BaseModel, ConfigDict, Field, ValidationError = (_pydantic.BaseModel, _pydantic.ConfigDict, _pydantic.Field,
                                                   _pydantic.ValidationError)

Dtype = Literal["float32", "bfloat16", "float16"]


class _Section(BaseModel):
    # Strict: a boolean is true/false (not "false", not 1), an integer is not 3.0 or true, a number is not a string;
    # finite numbers only. Numbers such as 3e-4 arrive as floats because recipes are read with YAML 1.2 floats
    # (pgzoo.recipe_yaml).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)


class LoraSection(_Section):
    """LoRA adapters on the policy (Hu et al. 2021; PEFT's ``LoraConfig``): W_eff = W + (alpha/r)·B·A on the targeted
    modules and parameters; only the adapters (and ``modules_to_save``) are trained (pgzoo.adapters.lora)."""

    r: int = Field(8, gt=0, description="adapter rank")
    alpha: float = Field(16.0, gt=0, description="scale numerator: the delta is (alpha/r)·B·A "
                                                 "(alpha/sqrt(r) with use_rslora)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter input in training (not in sampling)")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="module names (suffixes) or regexes as in PEFT, e.g. [q_proj, v_proj]; "
                                  "'all-linear' = every Linear but the output layer")
    target_parameters: list[str] = Field(
        default_factory=list, description="raw parameters to adapt (PEFT target_parameters), e.g. Qwen3-MoE's fused "
                                          "experts [mlp.experts.gate_up_proj, mlp.experts.down_proj]")
    modules_to_save: list[str] = Field(default_factory=list, description="modules trained in full alongside the "
                                                                         "adapters (e.g. [lm_head])")
    use_rslora: bool = Field(False, description="rank-stabilised scale alpha/sqrt(r)")

    @_pydantic.field_validator("target_modules", "target_parameters", "modules_to_save")
    @classmethod
    def _names(cls, value):
        if isinstance(value, list) and not all(v.strip() for v in value):
            raise ValueError("names must be non-empty strings, e.g. [q_proj, v_proj]")
        return value


class ModelSection(_Section):
    """The policy to train."""

    path: str | None = Field(None, description="Hugging Face checkpoint folder; null = the embedded tiny MoE's "
                                                "cached cold start for `task` (pgzoo.models.cold_start)")
    cold_start: dict[str, Any] = Field(default_factory=dict, description="options of ensure_cold_start "
                                                                         "(when path is null)")
    dtype: Dtype = Field("float32", description="training dtype")
    lora: LoraSection | None = Field(None, description="LoRA adapters (r, alpha, dropout, target_modules, ...); "
                                                       "null = full fine-tuning")


class TaskSection(_Section):
    """The verifiable-reward task (pgzoo.tasks)."""

    name: str = "arithmetic"
    options: dict[str, Any] = Field(default_factory=dict, description="task options, e.g. a data file path")


class ObjectiveSection(_Section):
    """The policy-gradient objective (pgzoo.get(name, **options))."""

    name: str = "minirl"
    options: dict[str, Any] = Field(default_factory=dict, description="overrides: eps_low, eps_high, is_cap, ...")
    advantage: str | None = Field(None, description="estimator in pgzoo.advantages; null = the objective's default")


class RolloutSection(_Section):
    """The inference engine and sampling."""

    engine: str = Field("vllm", description="a rollout engine of pgzoo.registry.engines: vllm, transformers, or one "
                                            "a package registers (entry-point group pgzoo.engines)")
    dtype: Dtype = Field("float32", description="rollout dtype (vs model.dtype: the training-inference gap)")
    fp8: bool = Field(False, description="FP8 (e4m3) rollout weights")
    router_dtype: Dtype | None = Field(None, description="transformers engine only: compute the MoE routers' logits "
                                                         "in this dtype (tokens near a top-k tie go to other experts "
                                                         "than in training); null = like the rest of the engine")
    prompts_per_step: int = Field(16, gt=0, description="B: prompts per global step")
    group_size: int = Field(8, gt=0, description="G: responses per prompt")
    max_new_tokens: int = Field(32, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    logprobs: Literal["engine", "none"] = Field(
        "engine", description="'engine': pass the inference engine's μ logprobs to the objective as rollout_logprobs; "
                              "'none': do not (objectives without training-inference correction only)")
    gpu_memory_utilization: float = Field(0.1, gt=0, le=1, description="vLLM only")
    max_model_len: int | None = Field(None, gt=0, description="vLLM only; default prompt + max_new_tokens headroom")
    verify_sync: float | None = Field(
        None, gt=0, description="after each weight sync, sample a probe (4 prompts x 8 tokens) and stop the run if the "
                                "engine's mean |log mu - log pi| on it exceeds this (e.g. 1e-4 for float32 engines); "
                                "null = off")
    sync_bucket_mb: float = Field(
        256.0, gt=0, description="weight sync streams the policy into the engine parameter by parameter in buckets of "
                                 "at most this many MB (a larger parameter travels alone); bounds the sync's extra "
                                 "memory per rank (pgzoo.rollout.sync)")

    @_pydantic.field_validator("engine")
    @classmethod
    def _registered_engine(cls, value: str) -> str:
        from pgzoo.errors import UnknownNameError
        from pgzoo.registry import engines

        try:
            return engines.entry(value)[0]  # the canonical name
        except (UnknownNameError, ConfigError) as exc:
            raise ValueError(str(exc)) from None


class StopOnSection(_Section):
    """When a run stops itself (pgzoo.guards): a diverged step stops with a clear error, the last checkpoint intact."""

    nonfinite: bool = Field(True, description="stop when the loss or the gradient norm is NaN or infinite")
    entropy_below: float | None = Field(1e-4, ge=0, description="stop when the mean token entropy (nats) falls "
                                                                "below this (collapsed to deterministic); null = never")
    entropy_uniform: float | None = Field(0.999, gt=0, le=1, description="stop when the mean token entropy "
                                                                         "exceeds this fraction of ln(vocabulary) "
                                                                         "(collapsed to uniform); null = never")


class TrainSection(_Section):
    """The optimisation loop."""

    steps: int = Field(40, gt=0, description="global steps (rollout + N updates each)")
    num_minibatches: int = Field(1, gt=0, description="N: optimizer steps per global step")
    micro_batch_size: int | None = Field(None, gt=0, description="responses per forward/backward "
                                                                 "(gradient accumulation); null = whole mini-batch")
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam betas, each in [0, 1)")
    grad_clip: float | None = Field(1.0, gt=0, description="max gradient norm; null = no clipping")
    warmup_steps: int = Field(0, ge=0, description="linear LR warmup, in optimizer steps")
    routing_replay: Literal["R2", "R3"] | None = Field(None, description="R2: replay the training engine's "
                                                                         "θold routes; R3: the rollout engine's")
    logprob_chunk_size: int | None = Field(None, gt=0, description="tokens per chunk of the memory-bounded logprob "
                                                                   "pass; null = about 2**26 logits per chunk")
    strategy: Literal["auto", "ddp", "fsdp"] = Field(
        "auto", description="data parallelism through Lightning: 'ddp' (a full replica per rank, gradients averaged "
                            "by DistributedDataParallel), 'fsdp' (FSDP2 fully_shard per decoder layer and on the root: "
                            "parameters, gradients and optimizer state sharded over ranks); 'auto' = ddp when "
                            "devices x num_nodes > 1")
    devices: int = Field(1, gt=0, description="processes per machine: GPUs on CUDA, CPU processes (gloo) otherwise")
    num_nodes: int = Field(1, gt=0, description="machines (torchrun --nnodes, SLURM --nodes)")
    activation_checkpointing: bool = Field(False, description="fsdp: recompute each decoder layer's activations in "
                                                              "the backward pass (less memory, ~1/3 more compute)")
    mixed_precision: bool = Field(False, description="fsdp on CUDA: bfloat16 parameters in forward/backward, "
                                                     "float32 gradient reduction and float32 master weights")
    threads: int | None = Field(1, gt=0, description="torch intra-op threads per process (set before the model "
                                                      "loads); 1 keeps a step steady beside other busy processes "
                                                      "(benchmarks/threads.py); null = torch's default (all cores)")
    stop_on: StopOnSection = Field(default_factory=lambda: StopOnSection(),
                                   description="stop the run when it diverges (pgzoo.guards)")

    @_pydantic.field_validator("betas", mode="before")
    @classmethod
    def _betas(cls, value):
        if isinstance(value, list):  # YAML has no tuples; the pair is written as a list
            value = tuple(value)
        if isinstance(value, tuple) and any(
                isinstance(b, (int, float)) and not isinstance(b, bool) and not 0 <= b < 1 for b in value):
            raise ValueError("each Adam beta must be in [0, 1), e.g. [0.9, 0.999]")
        return value


class EvalSection(_Section):
    """Held-out evaluation before and after training (pgzoo.evaluate)."""

    before: bool = True
    after: bool = True
    every: int = Field(0, ge=0, description="also evaluate every this many steps; 0 = only before/after")
    num_problems: int = Field(200, gt=0, description="held-out problems from the task's test split")
    k: int = Field(1, gt=0, description="samples per problem for avg@k / pass@k")
    temperature: float = Field(1.0, gt=0)
    max_new_tokens: int | None = Field(None, gt=0, description="null = rollout.max_new_tokens")
    files: dict[str, str] = Field(default_factory=dict, description="benchmark name -> problem file "
                                                                    "(user-supplied); empty = the task's test split")


class OutputSection(_Section):
    """The run folder."""

    dir: str = Field("runs/{name}", description="run folder; {name} is the recipe name")
    checkpoint_every: int = Field(10, ge=0, description="save a Hugging Face checkpoint every this many steps "
                                                        "(and at the end); 0 = only at the end")
    keep_checkpoints: int = Field(2, gt=0, description="newest step checkpoints kept")
    loggers: list[Literal["csv", "tensorboard", "wandb"]] = Field(default_factory=lambda: ["csv"])
    plots: bool = True
    progress_bar: bool = True


class Recipe(_Section):
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
        """π_θold from the training engine is needed off-policy (N > 1) and for R2 (its routes are recorded there)."""
        return self.train.num_minibatches > 1 or self.train.routing_replay == "R2"

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
        if r.group_size < 2:
            raise ConfigError("rollout.group_size must be >= 2: group-relative advantages of a group of one are 0, "
                              "so nothing would be learned")
        if r.fp8 and r.engine == "vllm" and r.dtype == "float32":
            raise ConfigError("rollout.fp8=true with rollout.dtype=float32: FP8 rollouts run in bfloat16 or float16 "
                              "activations; set rollout.dtype=bfloat16")
        if r.router_dtype is not None and r.engine != "transformers":
            raise ConfigError(f"rollout.router_dtype={r.router_dtype} needs rollout.engine=transformers: vLLM computes "
                              "the router inside its fused MoE layer in the model's dtype and has no setting for the "
                              "router alone; set rollout.engine=transformers or rollout.router_dtype=null")
        if self.eval.files and self.eval.k < 1:
            raise ConfigError("eval.k must be >= 1")
        self._check_objective()
        return self

    def _check_objective(self) -> None:
        import pgzoo

        from pgzoo.errors import PgzooError

        try:
            obj = pgzoo.get(self.objective.name, **self.objective.options)
        except PgzooError as exc:
            key = "objective.name" if "unknown objective" in str(exc) else "objective.options"
            raise ConfigError(f"{key}: {exc}") from None
        if "rollout_logprobs" in obj.requires and self.rollout.logprobs != "engine":
            raise ConfigError(
                f"objective {obj.name!r} requires the inference engine's logprobs (μ, its train-inference IS weight) "
                "but rollout.logprobs=none; set rollout.logprobs=engine or pick an objective without that factor "
                "(e.g. minirl-no-is)")
        if self.objective.advantage is not None:
            from pgzoo import advantages

            known = getattr(advantages, "ESTIMATORS", None) or getattr(advantages, "available", lambda: None)()
            if known is not None and self.objective.advantage not in known:
                raise ConfigError(f"objective.advantage={self.objective.advantage!r} is not an estimator in "
                                  f"pgzoo.advantages.{suggest(self.objective.advantage, known)} "
                                  f"Available: {', '.join(sorted(known))}")

    def check_environment(self) -> "Recipe":
        """Reject what this machine cannot run (called by `pgzoo train`, including --dry-run; `pgzoo recipe validate`
        checks the file only, so paper recipes validate anywhere)."""
        r, t = self.rollout, self.train
        if t.routing_replay == "R3" and r.engine == "vllm" and not _vllm_can_return_routes():
            raise ConfigError(
                "train.routing_replay=R3 needs the rollout engine's routes, but vLLM returns routed experts only with "
                "its Model Runner V2 on a GPU (enable_return_routed_experts), not on this machine; use "
                "rollout.engine=transformers (records routes while generating) or train.routing_replay=R2")
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
               if self.needs_old_logprobs else "no (on-policy: π_θold = π_θ detached)")
        lines = [
            f"recipe        {self.name}: {self.description}".rstrip(": "),
            f"model         {self.model.path or 'embedded tiny MoE, cached cold start'} (train {self.model.dtype})"
            f"{'' if self.model.lora is None else f', LoRA r={self.model.lora.r} alpha={self.model.lora.alpha:g}'}",
            f"task          {self.task.name} {self.task.options or ''}".rstrip(),
            f"objective     {self.objective.name} {self.objective.options or ''} advantage="
            f"{self.objective.advantage or 'objective default'}",
            f"rollout       {r.engine} ({r.dtype}{', fp8' if r.fp8 else ''}"
            f"{f', router {r.router_dtype}' if r.router_dtype else ''}), B={r.prompts_per_step} prompts x "
            f"G={r.group_size} = {self.responses_per_step} responses/step, <= {r.max_new_tokens} new tokens, "
            f"T={r.temperature}, μ logprobs: {r.logprobs}"
            f"{'' if r.verify_sync is None else f', sync checked (mean |Δ log p| <= {r.verify_sync:g})'}",
            f"updates       N={t.num_minibatches} optimizer step(s)/step of {self.minibatch_size} responses"
            f"{'' if t.micro_batch_size is None else f' in micro-batches of {t.micro_batch_size}'}"
            f", lr={t.lr:g}, grad_clip={t.grad_clip}",
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


def _vllm_can_return_routes() -> bool:
    """vLLM's enable_return_routed_experts needs Model Runner V2, which runs on CUDA GPUs only."""
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


# ---------------------------------------------------------------------- loading
def _section_fields(path: tuple) -> list[str]:
    """Valid keys at a dotted location of the schema (for 'did you mean')."""
    cls: Any = Recipe
    for part in path:
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return []
        cls = field.annotation
    return list(getattr(cls, "model_fields", {}))


def _format_errors(exc: ValidationError, source: str) -> ConfigError:
    lines = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        key = ".".join(loc)
        if err["type"] == "extra_forbidden":
            valid = _section_fields(loc[:-1])
            prefix = ".".join(loc[:-1]) + "." if loc[:-1] else ""
            hint = suggest(loc[-1], valid)
            if hint:
                hint = suggest(key, [prefix + v for v in valid])
            lines.append(f"unknown key {key!r}.{hint} Valid keys{' under ' + '.'.join(loc[:-1]) if loc[:-1] else ''}:"
                         f" {', '.join(valid)}")
        else:
            got = err.get("input")
            lines.append(f"{key}: {err['msg']} (got {got!r})")
    return ConfigError(f"{source}: " + "; ".join(lines))


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """``["train.lr=3e-4", "rollout.engine=vllm"]`` -> nested dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value; write e.g. train.lr=3e-4")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r} has an empty key part; write e.g. train.lr=3e-4")
        value = load_yaml(raw, f"override {item!r}") if raw.strip() else None
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {p!r}")
        node[parts[-1]] = value
    return out


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("options", "cold_start", "files"):
            out[k] = _merge(out[k], v)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def recipe_from_dict(data: dict, overrides: list[str] | dict | None = None, *, source: str = "recipe",
                     check: bool = True) -> Recipe:
    """Build and check a :class:`Recipe` from a dict plus overrides."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a recipe must be a YAML mapping of sections, got {type(data).__name__}")
    extra = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    merged = _merge(data, extra)
    try:
        recipe = Recipe.model_validate(merged)
    except ValidationError as exc:
        raise _format_errors(exc, source) from None
    return recipe.check() if check else recipe


# ---------------------------------------------------------------------- recipes shipped with pgzoo
def shipped_recipe_dir() -> Path | None:
    """The folder of the recipes pgzoo ships: the repository's ``recipes/``, installed as ``pgzoo.recipe_files``
    (so ``pgzoo train tiny/minirl`` works from any folder, with a wheel install too)."""
    from importlib import resources

    try:
        folder = Path(str(resources.files("pgzoo.recipe_files")))
    except (ModuleNotFoundError, TypeError):  # an install made before the recipes were packaged
        folder = Path(__file__).resolve().parent.parent / "recipes"
    return folder if (folder / "tiny").is_dir() else None


def shipped_recipes() -> dict[str, Path]:
    """Shipped recipes by name (``tiny/minirl``, ``paper/offpolicy-n4-minirl-r2``, ...), sorted."""
    folder = shipped_recipe_dir()
    if folder is None:
        return {}
    found = {f"{p.parent.name}/{p.stem}": p for p in folder.glob("*/*.yaml") if p.name != "grid.yaml"}  # grids: pgzoo.grid
    return dict(sorted(found.items()))


def find_recipe(name: str | os.PathLike) -> Path:
    """Resolve a recipe argument: an existing YAML file, else a shipped recipe (:func:`shipped_recipe`).

    A local file of the same path always wins, so ``recipes/tiny/minirl.yaml`` is the checkout's file inside a
    checkout and the installed copy anywhere else.
    """
    path = Path(name)
    if path.is_file():
        return path
    if path.is_dir():
        raise ConfigError(f"recipe {str(name)!r} is a folder; give one YAML file in it, e.g. "
                          f"{next(iter(sorted(path.glob('*.yaml'))), path / 'minirl.yaml')}")
    return shipped_recipe(name, missing="not found: no such file, and no shipped recipe of that name")


def shipped_recipe(name: str | os.PathLike, *, missing: str = "no shipped recipe of that name") -> Path:
    """The shipped recipe ``name``: ``tiny/minirl``, ``tiny/minirl.yaml`` or ``recipes/tiny/minirl.yaml`` (the paths
    the docs and the recipe headers use), or a bare file name that only one grid has (``cold-start-minirl-r2``)."""
    shipped = shipped_recipes()
    key = Path(name).as_posix()
    for prefix in ("./", "recipes/"):
        key = key[len(prefix):] if key.startswith(prefix) else key
    for ext in (".yaml", ".yml"):
        key = key[: -len(ext)] if key.endswith(ext) else key
    if key in shipped:
        return shipped[key]
    matches = [k for k in shipped if k.split("/", 1)[1] == key] if "/" not in key else []
    if len(matches) == 1:
        return shipped[matches[0]]
    if matches:
        raise ConfigError(f"recipe {str(name)!r} is ambiguous: {' or '.join(matches)}? Name the grid "
                          "(`pgzoo recipe list` shows every shipped recipe)")
    raise ConfigError(f"recipe {str(name)!r}: {missing}.{suggest(key, shipped)} `pgzoo recipe list` shows the "
                      "shipped recipes; `pgzoo recipe cp NAME FILE` copies one to edit")


def load_recipe(path: str | os.PathLike, overrides: list[str] | dict | None = None, *, check: bool = True) -> Recipe:
    """Load a recipe YAML (a file, or a shipped recipe's name: see :func:`find_recipe`), apply ``key=value``
    overrides, validate types and combinations."""
    path = find_recipe(path)
    data = load_yaml(path.read_text(), str(path))
    if data is None:
        raise ConfigError(f"{path}: the recipe file is empty; start from a shipped one with "
                          f"`pgzoo recipe cp tiny/minirl {path}`")
    if isinstance(data, dict):
        data.setdefault("name", path.stem)
    return recipe_from_dict(data, overrides, source=str(path), check=check)


# ---------------------------------------------------------------------- `pgzoo recipe validate | list | cp`
def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="recipe_command", metavar="ACTION", required=True)
    v = sub.add_parser("validate", help="check recipe files and print the resolved plan")
    v.add_argument("recipes", nargs="+", help="recipe YAML files or shipped recipe names (key=value overrides "
                                              "may follow)")
    v.add_argument("--check-files", action="store_true", help="also require model/eval/task paths to exist")
    v.add_argument("--print", dest="print_yaml", action="store_true", help="print the fully resolved YAML")
    ls = sub.add_parser("list", help="list the recipes shipped with pgzoo")
    ls.add_argument("pattern", nargs="?", default="*", help="wildcard filter, e.g. 'tiny/offpolicy-*'")
    cp = sub.add_parser("cp", help="copy a shipped recipe to a file, to edit")
    cp.add_argument("name", help="shipped recipe, e.g. tiny/minirl")
    cp.add_argument("dest", help="destination file (or folder)")
    cp.add_argument("--force", action="store_true", help="overwrite an existing file")


def list_recipes(pattern: str = "*") -> list[tuple[str, str]]:
    """(name, description) of the shipped recipes matching the wildcard ``pattern``."""
    import fnmatch

    out = []
    for name, path in shipped_recipes().items():
        if fnmatch.fnmatch(name, pattern):
            data = load_yaml(path.read_text(), str(path)) or {}
            out.append((name, str(data.get("description", "")) if isinstance(data, dict) else ""))
    return out


def copy_recipe(name: str, dest: str | os.PathLike, *, force: bool = False) -> Path:
    """Copy the shipped recipe ``name`` to ``dest`` (a file, or an existing folder); never overwrites unless
    ``force``. Returns the written path."""
    import shutil

    src = shipped_recipe(name)
    target = Path(dest)
    if target.is_dir():
        target = target / src.name
    if target.exists() and not force:
        raise ConfigError(f"{target} exists; pass --force to overwrite it, or choose another file")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, target)
    return target


def run(args: argparse.Namespace) -> int:
    if args.recipe_command == "list":
        rows = list_recipes(args.pattern)
        if not rows:
            raise ConfigError(f"no shipped recipe matches {args.pattern!r}; `pgzoo recipe list` shows them all")
        width = max(len(n) for n, _ in rows)
        for name, description in rows:
            print(f"{name:{width}s}  {description}")
        return 0
    if args.recipe_command == "cp":
        target = copy_recipe(args.name, args.dest, force=args.force)
        print(f"copied {args.name} to {target}; run it with: pgzoo train {target}")
        return 0
    files = [a for a in args.recipes if "=" not in a]
    overrides = [a for a in args.recipes if "=" in a]
    if not files:
        raise ConfigError("pgzoo recipe validate: give at least one recipe file")
    for f in files:
        recipe = load_recipe(f, overrides)
        if args.check_files:
            recipe.check_files()
        print(f"ok  {f}")
        print("    " + recipe.plan().replace("\n", "\n    "))
        if args.print_yaml:
            print(recipe.dump())
    return 0


__all__ = ["Recipe", "load_recipe", "recipe_from_dict", "parse_overrides", "add_arguments", "run", "find_recipe",
           "shipped_recipe", "shipped_recipes", "shipped_recipe_dir", "list_recipes", "copy_recipe",
           "ModelSection", "LoraSection", "TaskSection", "ObjectiveSection", "RolloutSection", "TrainSection",
           "EvalSection", "OutputSection"]
