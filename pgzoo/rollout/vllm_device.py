"""Which GPU :class:`~pgzoo.rollout.VLLMEngine` runs on: ``VLLMEngine(..., device="cuda:N")`` (recipe:
``rollout.device``) through vLLM's own ``device_ids`` engine argument.

    cuda_index("cuda:1")                      # 1 (strict: a "cuda:N" string or None)
    check_engine_device(1, engine_process=True, visible=2, current=0)
    vllm_device_args(1)                       # {"device_ids": [1]}, passed to vllm.LLM

vLLM (0.32 and later) takes ``device_ids``, the GPUs its workers use, "instead of setting CUDA_VISIBLE_DEVICES":
integer ids are read as indices into the ``CUDA_VISIBLE_DEVICES`` of the process that builds the engine
(``EngineArgs._resolve_device_ids``), which vLLM turns into physical ids (``ParallelConfig.assigned_physical_gpu_ids``);
its GPU worker maps its local rank through them back to the visible ordinal and makes that its CUDA device
(``torch.accelerator.set_device_index``). So the trainer's own logical ``cuda:N`` is what is passed, unchanged, and
nothing in the environment moves: the engine core process inherits the trainer's ``CUDA_VISIBLE_DEVICES`` whole
(NCCL and topology queries keep seeing every GPU), and the trainer's process is never narrowed.

In the trainer's process (``engine_process=False``) vLLM's worker would make its GPU the process's current CUDA
device and record the assignment process-wide, under the trainer: there only the trainer's current device is
accepted, and another one is refused, naming ``engine_process=True``.
"""

from __future__ import annotations

import dataclasses
import re

from pgzoo.errors import ConfigError, DependencyError

_CUDA = re.compile(r"cuda:(0|[1-9][0-9]*)")


def cuda_index(device) -> int | None:
    """The ``N`` of a ``"cuda:N"`` string (None for None); anything else raises :class:`ConfigError`."""
    if device is None:
        return None
    match = _CUDA.fullmatch(device) if isinstance(device, str) else None
    if match is None:
        raise ConfigError(f"VLLMEngine device={device!r} (rollout.device): a string 'cuda:N' naming one GPU as the "
                          "trainer's torch sees it (e.g. 'cuda:1'), or None for vLLM's default (the first GPU)")
    return int(match.group(1))


def check_engine_device(index: int, *, engine_process: bool, visible: int, current: int | None) -> None:
    """Refuse a GPU this process does not see (``visible``: ``torch.cuda.device_count()``) and, in the trainer's
    process (``engine_process=False``), any GPU but the trainer's ``current`` CUDA device (see the module
    docstring)."""
    if index >= visible:
        raise ConfigError(f"VLLMEngine device='cuda:{index}' (rollout.device): this process sees {visible} GPU(s) "
                          f"(cuda:0 to cuda:{visible - 1} through its CUDA_VISIBLE_DEVICES); name one of those")
    if not engine_process and index != current:
        raise ConfigError(
            f"VLLMEngine device='cuda:{index}' with engine_process=False: vLLM's worker would run in the trainer's "
            f"process and make cuda:{index} its current CUDA device (the trainer's is cuda:{current}); use "
            "VLLMEngine(..., engine_process=True), which puts vLLM's engine core and model on that GPU in a process "
            "of its own (pgzoo train does whenever rollout.device is set)")


def vllm_device_args(index: int, engine_args=None) -> dict:
    """The ``vllm.LLM`` keyword arguments that put its one worker on the trainer's ``cuda:index``: vLLM's
    ``device_ids``. ``engine_args``: vLLM's ``EngineArgs`` class (default: the installed one); a vLLM without
    ``device_ids`` raises :class:`DependencyError`."""
    if engine_args is None:
        from vllm.engine.arg_utils import EngineArgs as engine_args
    if "device_ids" not in {f.name for f in dataclasses.fields(engine_args)}:
        import vllm

        raise DependencyError(
            f"VLLMEngine device='cuda:{index}' (rollout.device) uses vLLM's device_ids engine argument, which this "
            f"vLLM {getattr(vllm, '__version__', '?')} lacks (vLLM 0.32 has it): upgrade vLLM, or leave device=None "
            "(vLLM then takes the first GPU CUDA_VISIBLE_DEVICES shows it)")
    return {"device_ids": [index]}


__all__ = ["check_engine_device", "cuda_index", "vllm_device_args"]
