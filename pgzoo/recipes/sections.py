"""The sections of a recipe: one typed class per YAML key (``model``, ``task``, ``objective``, ``rollout``, ``train``,
``eval``, ``output``), each field a sub-key with its default, bounds and meaning.

Every section is strict (:class:`Section`): unknown keys are rejected, a boolean is true/false, an integer is not 3.0,
numbers are finite. :class:`pgzoo.recipes.Recipe` holds one of each and checks the combinations that cannot run.
"""

from __future__ import annotations

from typing import Any, Literal

from pgzoo.errors import ConfigError, require

pydantic = require("pydantic", "lightning")
BaseModel, ConfigDict, Field = pydantic.BaseModel, pydantic.ConfigDict, pydantic.Field

Dtype = Literal["float32", "bfloat16", "float16"]


class Section(BaseModel):
    # Strict: a boolean is true/false (not "false", not 1), an integer is not 3.0 or true, a number is not a string;
    # finite numbers only. Numbers such as 3e-4 arrive as floats because recipes are read with YAML 1.2 floats
    # (pgzoo.recipes.strict_yaml).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)


class LoraSection(Section):
    """LoRA adapters on the policy (Hu et al. 2021; PEFT's ``LoraConfig``): W_eff = W + (alpha/r)·B·A on the targeted
    modules and parameters; only the adapters (and ``modules_to_save``) are trained (pgzoo.adapters.lightning.lora)."""

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

    @pydantic.field_validator("target_modules", "target_parameters", "modules_to_save")
    @classmethod
    def _names(cls, value):
        if isinstance(value, list) and not all(v.strip() for v in value):
            raise ValueError("names must be non-empty strings, e.g. [q_proj, v_proj]")
        return value


class ModelSection(Section):
    """The policy to train."""

    path: str | None = Field(None, description="Hugging Face checkpoint folder; null = the embedded tiny MoE's "
                                                "cached cold start for `task` (pgzoo.models.cold_start)")
    cold_start: dict[str, Any] = Field(default_factory=dict, description="options of ensure_cold_start "
                                                                         "(when path is null) and its `seed`: an "
                                                                         "integer (default 0, shared by every run "
                                                                         "seed) or `run` (a cold start per seed)")
    dtype: Dtype = Field("float32", description="training dtype")
    lora: LoraSection | None = Field(None, description="LoRA adapters (r, alpha, dropout, target_modules, ...); "
                                                       "null = full fine-tuning")

    @pydantic.field_validator("cold_start")
    @classmethod
    def _cold_start_seed(cls, value):
        if "seed" in value:  # checked at load, not when the run reaches its cold start
            from pgzoo.models.cold_start import check_cold_start_seed

            try:
                check_cold_start_seed(value["seed"])
            except ConfigError as exc:
                raise ValueError(str(exc).removeprefix("model.cold_start.")) from None
        return value


class TaskSection(Section):
    """The verifiable-reward task (pgzoo.tasks)."""

    name: str = "arithmetic"
    options: dict[str, Any] = Field(default_factory=dict, description="task options, e.g. a data file path")


class ObjectiveSection(Section):
    """The policy-gradient objective (pgzoo.get(name, **options))."""

    name: str = "minirl"
    options: dict[str, Any] = Field(default_factory=dict, description="overrides: eps_low, eps_high, is_cap, ...")
    advantage: str | None = Field(None, description="estimator in pgzoo.advantages; null = the objective's default")
    advantage_options: dict[str, Any] = Field(default_factory=dict, description="the estimator's options, e.g. "
                                              "{gamma: 0.99} for reinforce++ (`pgzoo objectives` lists them)")


class DynamicSamplingSection(Section):
    """DAPO's dynamic sampling (arXiv 2503.14476, eq. 11; verl's ``algorithm.filter_groups``): a group whose G task
    rewards are all equal has zero group-relative advantage, so it is dropped and more prompts are drawn until the
    step holds B groups whose rewards differ (pgzoo.adapters.lightning.sampling)."""

    max_draws: int = Field(10, gt=0, description="draws of B prompts per step at most (the first included; verl's "
                                                 "max_num_gen_batches, 10 in its DAPO recipe); when they hold fewer "
                                                 "than B groups whose rewards differ the run stops with an error, as "
                                                 "verl does (a resume may raise it: every completed step is the same)")


class OverlongBufferSection(Section):
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13; verl's ``reward_model.overlong_buffer``): a
    completion longer than rollout.max_new_tokens - len gets a penalty growing linearly to -penalty_factor at
    rollout.max_new_tokens, added to its task reward before advantages."""

    len: int = Field(gt=0, description="L_cache: the buffer's length in tokens, at most rollout.max_new_tokens "
                                       "(the paper: 4,096 of 20,480)")
    penalty_factor: float = Field(1.0, gt=0, description="the penalty at rollout.max_new_tokens tokens (the paper: 1)")


class RolloutSection(Section):
    """The inference engine and sampling."""

    engine: str = Field("vllm", description="a rollout engine of pgzoo.rollout.builders.engines: vllm, transformers, or one "
                                            "a package registers (entry-point group pgzoo.engines)")
    dtype: Dtype = Field("float32", description="rollout dtype (vs model.dtype: the training-inference gap)")
    fp8: bool = Field(False, description="FP8 (e4m3) rollout weights")
    router_dtype: Dtype | None = Field(None, description="engines that declare router_dtype (transformers): compute "
                                                         "the MoE routers' logits in this dtype (tokens near a top-k "
                                                         "tie go to other experts than in training); null = like the "
                                                         "rest of the engine")
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
    max_staleness: int = Field(
        0, ge=0, description="k: asynchronous RL. 0 = the synchronous loop (the engine samples step s with the "
                             "weights step s trains). k >= 1: the engine samples the next steps' rollouts in the "
                             "background while the trainer updates, and step s trains on rollouts sampled with the "
                             "weights of step max(0, s - k) (at most k policy versions old); pi_old is recomputed under "
                             "the current weights, so the objective's correction covers staleness and the "
                             "training-inference gap together (docs/training.md, Asynchronous)")
    device: str | None = Field(
        None, description="engines that declare device_choice (transformers, vllm): where the engine's model copy "
                          "lives, e.g. cuda:1, so generation runs on a device of its own; {local_rank} or "
                          "{local_rank+N} become the rank's index on its machine (plus N), e.g. cuda:{local_rank+8}; "
                          "vllm: a GPU (vLLM's device_ids, vLLM >= 0.32), its engine core then in a process of its "
                          "own; null = the engine's default (transformers: CPU, where the checkpoint loads; vllm: the "
                          "first GPU CUDA shows)")
    weight_transfer: Literal["nccl"] | None = Field(
        None, description="engines that declare weight_transfer (vllm, GPU builds): sync the weights through vLLM's "
                          "weight-transfer API, 'nccl' = the trainer's CUDA tensors broadcast to vLLM's workers (a "
                          "GPU apart from the trainer's: set rollout.device); null = the engine's default sync")
    dynamic_sampling: DynamicSamplingSection | None = Field(
        None, description="drop groups whose rewards are all equal and draw more prompts until B groups remain "
                          "(DAPO); {max_draws: 10}; null = off")
    overlong_buffer: OverlongBufferSection | None = Field(
        None, description="DAPO's soft length penalty near max_new_tokens added to the rewards "
                          "({len: L_cache, penalty_factor: 1.0}); null = off")

    @pydantic.field_validator("engine")
    @classmethod
    def _registered_engine(cls, value: str) -> str:
        from pgzoo.errors import UnknownNameError
        from pgzoo.rollout.builders import engines

        try:
            return engines.entry(value)[0]  # the canonical name
        except (UnknownNameError, ConfigError) as exc:
            raise ValueError(str(exc)) from None


class StopOnSection(Section):
    """When a run stops itself (pgzoo.adapters.lightning.guards): a diverged step stops with a clear error, the last checkpoint intact."""

    nonfinite: bool = Field(True, description="stop when the loss or the gradient norm is NaN or infinite")
    entropy_below: float | None = Field(1e-4, ge=0, description="stop when the mean token entropy (nats) falls "
                                                                "below this (collapsed to deterministic); null = never")
    entropy_uniform: float | None = Field(0.999, gt=0, le=1, description="stop when the mean token entropy "
                                                                         "exceeds this fraction of ln(vocabulary) "
                                                                         "(collapsed to uniform); null = never")


class TrainSection(Section):
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
    old_policy: Literal["current", "sampling"] = Field(
        "current", description="asynchronous runs (rollout.max_staleness >= 1): π_θold of a row, the policy the "
                               "clip and R2 are relative to. 'current': the weights being updated (decoupled PPO: "
                               "the importance weight π_θold/μ covers the staleness); 'sampling': the training "
                               "engine's logprobs under the weights of the version that sampled the row (the paper's "
                               "θ_old: the clip bounds the staleness), computed before those weights change. "
                               "Synchronously the two are the same")
    logprob_chunk_size: int | None = Field(None, gt=0, description="tokens per chunk of the memory-bounded logprob "
                                                                   "pass; null = about 2**26 logits per chunk")
    strategy: Literal["auto", "ddp", "fsdp"] = Field(
        "auto", description="data parallelism through Lightning: 'ddp' (a full replica per rank, gradients averaged "
                            "by DistributedDataParallel), 'fsdp' (FSDP2 fully_shard per decoder layer and on the root: "
                            "parameters, gradients and optimizer state sharded over ranks); 'auto' = ddp when "
                            "devices x num_nodes > 1")
    devices: int = Field(1, gt=0, description="processes per machine: GPUs on CUDA, CPU processes (gloo) otherwise")
    num_nodes: int = Field(1, gt=0, description="machines (torchrun --nnodes, SLURM --nodes)")
    dist_timeout: float = Field(1800.0, gt=0, allow_inf_nan=False,
                                description="seconds the ranks wait for each other (joining at the start, then each "
                                            "collective) before the run stops with an error; while ranks join, "
                                            "each machine says every 30 s what it waits for")
    activation_checkpointing: bool = Field(False, description="fsdp: recompute each decoder layer's activations in "
                                                              "the backward pass (less memory, ~1/3 more compute)")
    mixed_precision: bool = Field(False, description="fsdp on CUDA: bfloat16 parameters in forward/backward, "
                                                     "float32 gradient reduction and float32 master weights")
    threads: int | None = Field(1, gt=0, description="torch intra-op threads per process (set before the model "
                                                      "loads); 1 keeps a step steady beside other busy processes "
                                                      "(benchmarks/threads.py); null = torch's default (all cores)")
    mask_truncated_completions: bool = Field(
        False, description="completions cut at rollout.max_new_tokens get loss mask 0 and leave the normalisers "
                           "(DAPO's overlong filtering; TRL's GRPOConfig option of the same name)")
    stop_on: StopOnSection = Field(default_factory=lambda: StopOnSection(),
                                   description="stop the run when it diverges (pgzoo.adapters.lightning.guards)")

    @pydantic.field_validator("betas", mode="before")
    @classmethod
    def _betas(cls, value):
        if isinstance(value, list):  # YAML has no tuples; the pair is written as a list
            value = tuple(value)
        if isinstance(value, tuple) and any(
                isinstance(b, (int, float)) and not isinstance(b, bool) and not 0 <= b < 1 for b in value):
            raise ValueError("each Adam beta must be in [0, 1), e.g. [0.9, 0.999]")
        return value


class EvalSection(Section):
    """Held-out evaluation before and after training (pgzoo.models.evaluate)."""

    before: bool = True
    after: bool = True
    every: int = Field(0, ge=0, description="also evaluate every this many steps; 0 = only before/after")
    num_problems: int = Field(200, gt=0, description="held-out problems from the task's test split")
    k: int = Field(1, gt=0, description="samples per problem for avg@k / pass@k")
    temperature: float = Field(1.0, gt=0)
    max_new_tokens: int | None = Field(None, gt=0, description="null = rollout.max_new_tokens")
    files: dict[str, str] = Field(default_factory=dict, description="benchmark name -> problem file "
                                                                    "(user-supplied); empty = the task's test split")


class OutputSection(Section):
    """The run folder."""

    dir: str = Field("runs/{name}", description="run folder; {name} is the recipe name")
    checkpoint_every: int = Field(10, ge=0, description="save a Hugging Face checkpoint every this many steps "
                                                        "(and at the end); 0 = only at the end")
    keep_checkpoints: int = Field(2, gt=0, description="newest step checkpoints kept")
    loggers: list[Literal["csv", "tensorboard", "wandb"]] = Field(default_factory=lambda: ["csv"])
    plots: bool = True
    progress_bar: bool = True


__all__ = ["Dtype", "LoraSection", "ModelSection", "TaskSection", "ObjectiveSection", "DynamicSamplingSection",
           "OverlongBufferSection", "RolloutSection", "StopOnSection",
           "TrainSection", "EvalSection", "OutputSection"]
