"""Data parallelism through Lightning: the strategy of a recipe, FSDP2 sharding, and the few collectives of the loop.

    trainer = lightning.Trainer(**trainer_parallelism(recipe), ...)   # strategy, accelerator, devices, num_nodes
    # in RLModule.configure_model (fsdp): shard_policy(policy, mesh, activation_checkpointing=..., mixed_precision=...)

Lightning starts and supervises the processes: its subprocess launcher for ``train.devices > 1`` on one machine, or
none when ``torchrun`` / SLURM already started one process per rank (its cluster environments read ``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` / ``SLURM_*``). pgzoo adds only the objective's semantics: the
normalisers of a mini-batch (sequence and token counts) are summed over ranks before its first micro-batch, and the
loss is scaled by the number of ranks because DDP and FSDP average gradients
(``1/W Σ_r ∇(W·loss_r) = Σ_r ∇loss_r``, the single-process gradient of the mini-batch).

FSDP2 (``torch.distributed.fsdp.fully_shard``) goes through Lightning's ``ModelParallelStrategy``: it builds the
device mesh, calls ``LightningModule.configure_model`` (where the policy is sharded per decoder layer, then at the
root), materialises, and sets up the optimizer over the sharded (DTensor) parameters. The mesh is one-dimensional
data parallel (``data_parallel_size = world, tensor_parallel_size = 1``): pure ZeRO-3-style sharding.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from typing import Any

import torch

from pgzoo.errors import ConfigError, PgzooError


def env_rank() -> int:
    """This process's global rank as the launcher announced it (before any process group exists): ``RANK``
    (torchrun), ``SLURM_PROCID``, or ``NODE_RANK x devices + LOCAL_RANK`` (Lightning's launcher); 0 otherwise."""
    for key in ("RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    if os.environ.get("LOCAL_RANK", "").isdigit():
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)  # only "is it 0" matters before fit
        return int(os.environ.get("NODE_RANK", "0") or 0) * per_node + int(os.environ["LOCAL_RANK"])
    return 0


def world() -> tuple[int, int]:
    """(world size, rank) of the initialised process group, (1, 0) without one."""
    d = torch.distributed
    return (d.get_world_size(), d.get_rank()) if d.is_available() and d.is_initialized() else (1, 0)


def all_reduce_sum(x: torch.Tensor, strategy=None) -> torch.Tensor:
    """Σ over ranks of ``x`` through the Lightning strategy (``strategy.reduce(..., "sum")``); ``x`` as is on one
    process. Without a strategy (a module driven by hand inside a process group) torch.distributed directly."""
    if world()[0] == 1:
        return x
    if strategy is not None:
        return strategy.reduce(x, reduce_op="sum")
    torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.SUM)
    return x


def gather_rows(x: torch.Tensor, strategy=None) -> torch.Tensor:
    """``[W, *x.shape]``: every rank's ``x`` (equal shapes on every rank), rank order, through the strategy's
    ``all_gather``; ``x[None]`` on one process. Without a strategy, torch.distributed directly."""
    size = world()[0]
    if size == 1:
        return x[None]
    if strategy is not None:
        return strategy.all_gather(x)
    out = [torch.empty_like(x) for _ in range(size)]
    torch.distributed.all_gather(out, x.contiguous())
    return torch.stack(out)


def trainer_parallelism(recipe) -> dict[str, Any]:
    """The ``lightning.Trainer`` keywords of ``recipe.train``: accelerator, devices, num_nodes and the strategy."""
    t = recipe.train
    cuda = torch.cuda.is_available()
    kw: dict[str, Any] = {"accelerator": "gpu" if cuda else "cpu", "devices": t.devices, "num_nodes": t.num_nodes}
    if cuda and t.devices > torch.cuda.device_count():
        raise ConfigError(f"train.devices={t.devices} but this machine has {torch.cuda.device_count()} GPU(s); one "
                          f"GPU per process: set train.devices={torch.cuda.device_count()}")
    kind = recipe.strategy
    if kind == "single":
        kw["strategy"] = "auto"
        return kw
    import datetime

    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    timeout = datetime.timedelta(seconds=t.dist_timeout)
    backend = "nccl" if cuda else "gloo"
    if kind == "ddp":
        # MoE routing leaves experts without gradient in a micro-batch: DDP must look for unused parameters
        kw["strategy"] = DDPStrategy(find_unused_parameters=True, process_group_backend=backend, timeout=timeout)
    else:
        kw["strategy"] = ModelParallelStrategy(data_parallel_size=recipe.world_size, tensor_parallel_size=1,
                                               save_distributed_checkpoint=True, process_group_backend=backend,
                                               timeout=timeout)
    return kw


def launcher() -> str | None:
    """Who started this process as one rank of a run: ``torchrun``, ``slurm``, ``lightning`` (its multi-node
    environment: ``MASTER_ADDR`` and ``NODE_RANK`` set on each machine), or None (a plain process)."""
    env = os.environ
    if env.get("TORCHELASTIC_RUN_ID") or ("RANK" in env and "WORLD_SIZE" in env):
        return "torchrun"
    if env.get("SLURM_NTASKS") and env.get("SLURM_PROCID"):
        return "slurm"
    if env.get("MASTER_ADDR") and env.get("NODE_RANK"):
        return "lightning"
    return None


def check_launcher(num_nodes: int) -> None:
    """Several machines need a launcher on each of them; without one, Lightning's rank 0 would wait for machines that
    were never told to join (``train.dist_timeout`` long, 30 minutes by default)."""
    if num_nodes > 1 and launcher() is None:
        raise ConfigError(
            f"train.num_nodes={num_nodes}, but this process was not started as one machine of a {num_nodes}-machine "
            "job: start it on every machine with torchrun (--nnodes, --node-rank, --rdzv-endpoint) or under SLURM "
            "(srun), or set MASTER_ADDR, MASTER_PORT and NODE_RANK on each machine; on one machine use "
            "train.num_nodes=1 with train.devices=N (see docs/training.md, Scale out)")


@contextlib.contextmanager
def rendezvous_notice(world_size: int, num_nodes: int, timeout: float, *, every: float | None = None, say=None):
    """While this process waits for the other ranks to join (until torch.distributed's process group exists), say
    every ``every`` seconds (default: 30, or a quarter of ``timeout`` when that is shorter) what it waits for: how many ranks, at which address, as which machine, for how long
    before ``train.dist_timeout`` gives up. One process per machine speaks (local rank 0). Silent on one process."""
    local = os.environ.get("LOCAL_RANK") or os.environ.get("SLURM_LOCALID") or "0"
    if world_size <= 1 or local != "0":
        yield
        return
    say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
    every = every if every is not None else min(30.0, timeout / 4)
    done = threading.Event()

    def watch():
        start = time.monotonic()
        while not done.wait(every):
            d = torch.distributed
            if d.is_available() and d.is_initialized():
                return
            where = f"{os.environ.get('MASTER_ADDR', '127.0.0.1')}:{os.environ.get('MASTER_PORT', '(default port)')}"
            node = os.environ.get("NODE_RANK") or os.environ.get("GROUP_RANK") or os.environ.get("SLURM_NODEID") or "0"
            waited = time.monotonic() - start
            say(f"pgzoo: waiting for the {world_size} ranks of {num_nodes} machine(s) to join at {where} (this is "
                f"machine {node}, {launcher() or 'no launcher'}); {waited:.0f} s so far, giving up after "
                f"train.dist_timeout={timeout:g} s")

    thread = threading.Thread(target=watch, name="pgzoo-rendezvous-notice", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder blocks of a Hugging Face causal LM (``model.model.layers`` for Llama/Qwen/Mixtral-style models)."""
    from pgzoo.rollout.lora import is_peft_model

    if is_peft_model(model):  # a LoRA policy: the layers of the transformers model inside
        model = model.base_model.model
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None) or getattr(getattr(base, "decoder", None), "layers", None)
    if layers is None:
        raise ConfigError(f"train.strategy=fsdp: cannot find the decoder layers of {type(model).__name__} "
                          f"(expected model.model.layers); use train.strategy=ddp")
    return list(layers)


def shard_policy(model: torch.nn.Module, mesh, *, activation_checkpointing: bool = False,
                 mixed_precision: bool = False) -> torch.nn.Module:
    """FSDP2: ``fully_shard`` each decoder layer (one all-gather unit each, resharded after forward), then the root
    (embeddings, final norm, LM head). ``mixed_precision``: bfloat16 parameters in compute, float32 gradient
    reduction (the sharded master weights stay in their dtype). ``activation_checkpointing`` wraps each layer
    (recomputed in backward; routing-replay hooks replay there too, see pgzoo.routing)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw: dict[str, Any] = {"mesh": mesh}
    if mixed_precision:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    layers = decoder_layers(model)
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

        ids = {id(m) for m in layers}
        apply_activation_checkpointing(model, check_fn=lambda m: id(m) in ids)
        layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The consolidated parameters of a (possibly sharded) model on rank 0, on the CPU (empty on other ranks):
    ``torch.distributed.checkpoint.state_dict.get_model_state_dict`` with ``full_state_dict=True, cpu_offload=True``
    (gathered tensor by tensor, so no rank holds two copies)."""
    if not is_sharded(model):
        return {k: v.detach() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# ---------------------------------------------------------------------- failures of a multi-rank run
class Stopped(PgzooError):
    """Lightning stopped this rank on SIGTERM (its ``SIGTERMException``, possible only before pgzoo's own handler
    takes over at ``on_train_start``; :mod:`pgzoo.adapters.lightning.signals`). The CLI exits with 143 (128 + SIGTERM)."""

    exit_code = 128 + signal.SIGTERM


def with_resume_hint(exc: BaseException, run_dir, world_size: int, step: int, command: str | None) -> BaseException:
    """A pgzoo error, a torch.distributed failure (a peer rank died) or Lightning's SIGTERM exit, as a pgzoo error
    that says where the run stands and how to continue; other exceptions unchanged."""
    from pgzoo.adapters.lightning.run_folder import latest_checkpoint

    if type(exc).__name__ == "SIGTERMException":
        exc = Stopped("stopped by SIGTERM: another rank failed or the job was cancelled")
    if not isinstance(exc, PgzooError):
        text = str(exc)
        lost = isinstance(exc, getattr(torch.distributed, "DistError", ())) or any(
            word in text.lower() for word in ("gloo", "nccl", "connection"))
        if not lost:
            return exc
        first = text.splitlines()[0] if text else ""
        exc = PgzooError(f"rank {env_rank()} lost contact with another rank during step {step} "
                         f"({type(exc).__name__}: {first}); the other rank died (killed, out of memory) or its "
                         "machine is unreachable")
    last = latest_checkpoint(run_dir, intact=True)
    how = command or f"pgzoo train <recipe> output.dir={run_dir}"
    if world_size > 1 and os.environ.get("TORCHELASTIC_RUN_ID"):
        how = f"the same torchrun command ({how} ...)"
    where = (f"The last checkpoint ({last}) is intact; continue with: {how} --resume"
             if last is not None else "No checkpoint had been written yet; rerun to start again.")
    exc.args = (f"{exc.args[0] if exc.args else exc}. {where}", *exc.args[1:])
    return exc


__all__ = ["Stopped", "with_resume_hint", "env_rank", "world", "all_reduce_sum", "gather_rows", "launcher", "check_launcher",
           "rendezvous_notice", "trainer_parallelism", "shard_policy", "full_state_dict", "is_sharded", "decoder_layers"]
