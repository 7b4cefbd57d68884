"""The model side of a vLLM weight sync: one function that vLLM's ``collective_rpc`` runs where the model lives.

    engine.llm.collective_rpc(load_checkpoint_tensors, kwargs={"weights": tensors, "cpu": True})

:class:`~pgzoo.rollout.VLLMEngine` runs the model either in the trainer's process (``collective_rpc`` then calls this
function here and ``weights`` is a lazy iterator over the trainer's tensors, passed by reference) or in vLLM's engine
core process (``engine_process=True``: vLLM pickles the function by reference, the engine core imports this module
and calls it there, and ``weights`` arrives as the bytes of :func:`serialise`). Either way the same code writes the
CPU fused-MoE experts into the kernel's prepacked storage (:mod:`pgzoo.rollout.vllm_cpu_moe`, which has to touch the
model's own tensors, so it must run in the model's process) and hands every other tensor to vLLM's in-place
``reload_weights``.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator

import torch

from pgzoo.rollout.vllm_cpu_moe import EXPERT_NAME, cpu_moe_targets
from pgzoo.rollout.vllm_support import quiet_reload_warnings

# How many unsent expert tensors a result names (the count is always complete).
MISSING_SHOWN = 2


def serialise(weights: Iterable[tuple[str, torch.Tensor]]) -> bytes:
    """``(checkpoint name, tensor)`` pairs as one byte string for ``collective_rpc`` (tensors moved to CPU): vLLM's
    IPC carries bytes unchanged, while tensors nested in a utility call's arguments arrive as raw buffers."""
    buffer = io.BytesIO()
    torch.save([(name, tensor.detach().contiguous().cpu()) for name, tensor in weights], buffer)
    return buffer.getvalue()


def _deserialise(payload) -> list[tuple[str, torch.Tensor]]:
    return torch.load(io.BytesIO(bytes(payload)), weights_only=True)


def load_checkpoint_tensors(worker, weights, cpu: bool) -> dict:
    """Worker side (vLLM calls it with its worker as ``worker``): reload the model in place from ``weights``, an
    iterable of ``(checkpoint name, tensor)`` or the bytes of :func:`serialise`. On CPU (``cpu``) the fused-MoE
    experts are written expert by expert into the kernel's layout and the rest goes through vLLM's layerwise
    ``reload_weights``. Returns ``{"experts": expected expert tensors, "missing": count, "missing_names": a few}``
    (plain values: the result crosses the process boundary too)."""
    if isinstance(weights, (bytes, bytearray, memoryview)):
        weights = _deserialise(weights)
    experts = cpu_moe_targets(worker) if cpu else {}
    written: set[tuple[str, int, str]] = set()

    def rest() -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            hit = EXPERT_NAME.match(name) if experts else None
            if hit and hit["prefix"] in experts:
                experts[hit["prefix"]].write(int(hit["expert"]), hit["proj"], tensor)
                written.add((hit["prefix"], int(hit["expert"]), hit["proj"]))
                continue
            yield name, tensor

    with quiet_reload_warnings():
        worker.reload_weights(weights_iterator=rest())  # what collective_rpc("reload_weights") calls
    expected = {(p, e, proj) for p, ex in experts.items() for e in range(ex.w13.shape[0])
                for proj in ("gate_proj", "up_proj", "down_proj")}
    missing = sorted(expected - written)
    return {"experts": len(expected), "missing": len(missing), "missing_names": [list(m) for m in
                                                                                 missing[:MISSING_SHOWN]]}


__all__ = ["load_checkpoint_tensors", "serialise"]
