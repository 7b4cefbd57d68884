"""A weight sync into :class:`~pgzoo.rollout.VLLMEngine` through vLLM's own weight-transfer API over NCCL
(``VLLMEngine(..., weight_transfer="nccl")``): GPU to GPU, no serialisation, as TRL's asynchronous trainer does.

    sender = NCCLWeightSender(engine.llm, dtype=torch.bfloat16, workers=1)
    sender.send(plan, buckets)      # first call: the NCCL rendezvous; every call: start -> update + broadcast -> finish
    sender.close()

What is vLLM's and what is pgzoo's:

* vLLM's ``NCCLTrainerWeightTransferEngine`` (``vllm.distributed.weight_transfer.nccl_engine``) does the transfer:
  ``trainer_init`` opens the trainer's endpoint as rank 0 of a group of ``1 + workers`` while the workers join it,
  and ``send_weights()`` drives one round: ``start_weight_update`` (the workers begin vLLM's layerwise reload),
  ``update_weights`` with every tensor's name, dtype and shape, run on a side thread while the trainer broadcasts the
  tensors (packed into vLLM's buffers), then ``finish_weight_update`` (the layerwise reload re-fuses and re-packs each
  layer: the same lifecycle as the ``reload_weights`` of the default path, so FP8 weights are re-quantised there too).
* :class:`LLMWeightSyncClient` is pgzoo's client for vLLM's ``VLLMWeightSyncClient`` protocol: each control call is
  the worker method of the same name through ``LLM.collective_rpc``, which reaches the workers in this process or in
  vLLM's engine core process alike (how ``vllm.v1.engine.async_llm.AsyncLLM`` implements the same calls).
* :class:`SyncSource` is the weights of one sync as vLLM's ``WeightSource``: its metadata is the plan pgzoo's sync
  checked against the engine before anything moved (:func:`pgzoo.rollout.sync.sync_plan`: checkpoint names, so
  per-expert MoE tensors and a LoRA model's effective weights under their base names), its iteration the buckets of
  :func:`pgzoo.rollout.sync.iter_sync_buckets` (FSDP2 shards gathered, LoRA merged), cast to the engine's dtype.

Every engine pgzoo builds is fed by the trainer process that built it, so that process is always the sender
(``rank=0`` of vLLM's ``TrainerInitInfo``). A rank without an engine calls ``sync_weights(policy, None)``, which
walks the same gathers and discards them: what vLLM's engine does on a non-sender rank (it only iterates the source).

NCCL holds one rank per GPU: the trainer's device and the vLLM workers' must differ (checked before the rendezvous).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource
from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo, NCCLTrainerWeightTransferEngine
from vllm.utils.network_utils import get_ip, get_open_port

from pgzoo.errors import ConfigError, EngineError

# The control calls after which a failed round may be retried: the worker raised and ended its update session itself
# (vLLM's Worker.update_weights resets it on any exception) and no broadcast is left waiting for it.
RETRYABLE = ("start_weight_update", "update_weights")


class LLMWeightSyncClient:
    """vLLM's ``VLLMWeightSyncClient`` over ``llm.collective_rpc``; remembers which call failed and which is running
    (the sender reads them to tell a retryable failure from a transfer left waiting in NCCL)."""

    def __init__(self, llm) -> None:
        self.llm = llm
        self.failed: str | None = None
        self.running: set[str] = set()

    def _call(self, method: str, **kwargs) -> None:
        self.running.add(method)
        try:
            self.llm.collective_rpc(method, kwargs=kwargs or None)
        except BaseException:
            self.failed = method
            raise
        finally:
            self.running.discard(method)

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self._call("init_weight_transfer_engine", init_info=init_info)

    def start_weight_update(self) -> None:
        self._call("start_weight_update")

    def update_weights(self, update_info) -> None:
        self._call("update_weights", update_info=update_info)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        if weight_version is not None:  # versions live in vLLM's serving front ends; an LLM keeps none
            raise EngineError(f"finish_weight_update(weight_version={weight_version!r}): a colocated vllm.LLM keeps "
                              "no weight versions; call it without one")
        self._call("finish_weight_update")

    def shutdown_weight_transfer_engine(self) -> None:
        self._call("shutdown_weight_transfer_engine")


@dataclass
class SyncSource(WeightSource):
    """One sync's weights as vLLM's ``WeightSource``: ``plan`` is ``[(checkpoint name, shape, dtype)]`` in the order
    ``buckets`` yields them; floating tensors travel in ``dtype`` (the engine's), on ``device`` (the trainer's CUDA
    device). One pass only: the buckets are consumed as they are sent."""

    plan: list[tuple[str, tuple[int, ...], torch.dtype]]
    buckets: Iterable[list[tuple[str, torch.Tensor]]]
    dtype: torch.dtype
    device: torch.device

    def metadata(self) -> list[ParamMeta]:
        return [ParamMeta(name, self.dtype if dtype.is_floating_point else dtype, tuple(shape))
                for name, shape, dtype in self.plan]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        buckets, self.buckets = self.buckets, ()  # a second pass would send nothing; vLLM then names the gap
        for bucket in buckets:
            for name, tensor in bucket:
                if tensor.is_floating_point() and tensor.dtype != self.dtype:
                    tensor = tensor.to(self.dtype)
                if tensor.device != self.device:
                    tensor = tensor.to(self.device)
                yield name, tensor
            bucket = tensor = None  # let the sync's generator free it before it gathers the next


def worker_gpu(worker) -> str:
    """Worker side (through ``collective_rpc``): the UUID of the GPU this vLLM worker runs on."""
    return str(torch.cuda.get_device_properties(worker.device).uuid)


def trainer_device(tensor: torch.Tensor) -> torch.device:
    """Where the trainer sends from: the CUDA device of the policy's tensors (``tensor``: the first one of the sync),
    else this thread's current CUDA device. (An engine in this process makes its own GPU the current device when it
    starts, so the policy's device is the one to trust.)"""
    if tensor.is_cuda:
        return tensor.device
    if not torch.cuda.is_available():
        raise ConfigError("weight_transfer='nccl' (rollout.weight_transfer): the trainer's side of vLLM's NCCL "
                          "weight transfer needs a CUDA device and this process sees none; use weight_transfer=None")
    return torch.device("cuda", torch.cuda.current_device())


def trainer_gpu(device: torch.device) -> str:
    """The UUID of the GPU ``device`` (a :func:`trainer_device`)."""
    return str(torch.cuda.get_device_properties(device).uuid)


@contextlib.contextmanager
def current_device(device: torch.device):
    """``device`` as this thread's current CUDA device (vLLM opens the trainer's endpoint and sends on it)."""
    if device.type != "cuda":
        yield
        return
    with torch.cuda.device(device):
        yield


class NCCLWeightSender:
    """Drives vLLM's ``NCCLTrainerWeightTransferEngine`` for one engine (see the module docstring).

    Attributes:
        weights_valid: False from a failed round until one succeeds: vLLM's layerwise reload put the model's layers
            on the meta device at ``start_weight_update`` and refills them as tensors arrive, so after a failure
            the engine's weights are partly undefined and it must not sample.
        unusable: why no round may run again (the engine must be closed), or None.
    """

    def __init__(self, llm, dtype: torch.dtype, workers: int) -> None:
        self.client = LLMWeightSyncClient(llm)
        self.dtype = dtype
        self.workers = workers
        self.transfer: NCCLTrainerWeightTransferEngine | None = None
        self.weights_valid = True
        self.unusable: str | None = None

    def send(self, plan, buckets) -> None:
        """Send one sync (``plan``: ``[(name, shape, dtype)]``; ``buckets``: the tensors in that order)."""
        if self.unusable:
            raise EngineError(f"vLLM's NCCL weight transfer cannot run again ({self.unusable}); close this "
                              "VLLMEngine and build a new one")
        buckets = iter(buckets)
        first = next(buckets, None)
        if first is None or not first:
            raise EngineError("weight sync: the policy yielded no tensors to send")
        device = trainer_device(first[0][1])
        source = SyncSource(list(plan), itertools.chain([first], buckets), self.dtype, device)
        del first
        with current_device(device):
            self._send(source, device)

    def _send(self, source: SyncSource, device: torch.device) -> None:
        if self.transfer is None:
            self._open(source, device)
        self.transfer.source = source  # vLLM's full-resync engines replay `source` each round
        self.client.failed = None
        try:
            self.transfer.send_weights()
        except BaseException as exc:
            self.weights_valid = False
            # A broadcast that failed, or an update_weights still running, leaves the workers inside an NCCL call
            # that will never complete (vLLM: "the transfer group is unusable either way"); a failed
            # finish_weight_update leaves the worker's update session open, so start_weight_update would refuse.
            if self.client.failed not in RETRYABLE or "update_weights" in self.client.running:
                where = self.client.failed or "the trainer's broadcast"
                self.unusable = f"{where} failed: {type(exc).__name__}: {exc}"
                raise EngineError(f"weight sync through vLLM's NCCL weight transfer failed in {where} "
                                  f"({type(exc).__name__}: {exc}); the engine's workers may still wait in NCCL and "
                                  "its weights are partly undefined: close this VLLMEngine and build a new one") \
                    from exc
            raise EngineError(f"weight sync through vLLM's NCCL weight transfer failed in {self.client.failed} "
                              f"({type(exc).__name__}: {exc}); the engine refuses to generate until a sync "
                              "succeeds (its layers were being reloaded)") from exc
        self.weights_valid = True

    def _open(self, source: SyncSource, device: torch.device) -> None:
        """The rendezvous, once: vLLM's ``trainer_init`` with an address and a free port from vLLM's own helpers."""
        try:
            workers_gpus = self.client.llm.collective_rpc(worker_gpu)
        except Exception as exc:
            raise EngineError(f"asking vLLM's workers for their GPUs failed: {exc}") from exc
        if trainer_gpu(device) in workers_gpus:
            raise ConfigError(
                f"weight_transfer='nccl' (rollout.weight_transfer): the policy's CUDA device ({device}) is a GPU "
                "vLLM's workers run on, and NCCL cannot hold two ranks on one GPU. Give vLLM another GPU with "
                "VLLMEngine(..., device='cuda:N', engine_process=True) (rollout.device; without it vLLM takes the first "
                "GPU CUDA shows it), put the policy on another one, or use weight_transfer=None")
        info = NCCLTrainerInitInfo(master_address=get_ip(), master_port=get_open_port(),
                                   world_size=1 + self.workers, rank=0)
        try:
            self.transfer = NCCLTrainerWeightTransferEngine.trainer_init(info, client=self.client, source=source)
        except Exception as exc:
            raise EngineError(f"opening vLLM's NCCL weight transfer ({info.master_address}:{info.master_port}, "
                              f"{info.world_size} ranks) failed in {self.client.failed or 'the trainer endpoint'}: "
                              f"{type(exc).__name__}: {exc}. The engine keeps its weights") from exc

    def close(self) -> None:
        """Shut the transfer down on both sides (not where a worker may still wait in NCCL: closing the engine ends
        its workers then)."""
        transfer, self.transfer = self.transfer, None
        if transfer is None or self.unusable:
            return
        try:
            self.client.shutdown_weight_transfer_engine()
        finally:
            transfer.shutdown()


__all__ = ["LLMWeightSyncClient", "NCCLWeightSender", "SyncSource", "current_device", "trainer_device", "trainer_gpu",
           "worker_gpu"]
