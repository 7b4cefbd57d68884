"""Check a weight sync by logprob parity: the engine's μ on a short probe against the trainer's logprobs.

    from pgzoo.rollout.sync_check import check_sync
    engine.load_weights(policy)
    result = check_sync(engine, policy, prompts[:4], tolerance=1e-4)   # EngineError when mean |Δ log p| > 1e-4

An in-place weight sync can fail silently: the engine keeps generating, only from wrong weights. On CPU, vLLM's
in-place reload leaves fused MoE expert tensors in a layout its kernel does not read (pgzoo writes those blocks
itself, see docs/rollout.md); a future engine version could change such a layout again. The one observable that
does not depend on how the weights got there is parity: sample a few tokens with the engine at temperature 1 and
score the same tokens with the trainer's model. With both in float32 the mean |log μ − log π| is ~1e-6 after a
correct sync and ~1e-2 or more after a broken one; with a bfloat16 or FP8 engine the honest gap is itself ~1e-2, so
the tolerance belongs to the recipe (``rollout.verify_sync``).

Cost: one generate of ``len(prompts)`` × ``max_new_tokens`` tokens and one no-grad forward of the model over them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pgzoo.errors import EngineError
from pgzoo.rollout.base import unwrap


def _is_fsdp(module: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(module, FSDPModule)


def _root_forward_logprobs(module, ro) -> torch.Tensor:
    """Completion logprobs through the model's own forward. Under FSDP2 the root's forward hook gathers the root's
    parameters (embeddings, final norm, head); pgzoo.models.logprobs calls the decoder and head directly, which would see
    shards. One full-vocabulary forward of a short probe (collective: every rank runs the check)."""
    from pgzoo.models.logprobs import naive_logprobs_and_entropy, position_ids_from_mask

    am = ro.attention_mask
    try:
        logits = module(input_ids=ro.input_ids, attention_mask=am, position_ids=position_ids_from_mask(am),
                        use_cache=False).logits
    finally:
        module.reshard()  # the root keeps its parameters gathered after a forward (for a backward that won't come)
    p = ro.prompt_ids.shape[1]
    return naive_logprobs_and_entropy(logits[:, p - 1:-1], ro.completion_ids).logprobs


@dataclass(frozen=True)
class SyncCheck:
    """Parity of the engine's logprobs with the model's on a probe: mean and max |log μ − log π| over its tokens."""

    mean_abs_diff: float
    max_abs_diff: float
    num_tokens: int


def check_sync(engine, model: torch.nn.Module, prompts: list[list[int]], *, max_new_tokens: int = 8, seed: int = 0,
               tolerance: float | None = None) -> SyncCheck:
    """Sample ``prompts`` × ``max_new_tokens`` with ``engine`` (temperature 1) and compare its logprobs μ with
    ``model``'s logprobs of the same tokens (one forward, no gradient, eval mode, restored afterwards).

    Raises:
        EngineError: when ``tolerance`` is given and the mean |Δ log p| exceeds it (or is not finite).
    """
    from pgzoo.models.logprobs import completion_logprobs

    if not prompts:
        raise EngineError("check_sync needs at least one probe prompt")
    ro = engine.generate(prompts, n=1, max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0, seed=seed)
    module = unwrap(model)
    device = next(module.parameters()).device
    ro = ro.to(device)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            if _is_fsdp(module):
                logprobs = _root_forward_logprobs(module, ro)
            else:
                logprobs = completion_logprobs(module, ro.prompt_ids, ro.prompt_mask, ro.completion_ids,
                                               ro.completion_mask, with_entropy=False).logprobs
    finally:
        module.train(was_training)
    mask = ro.completion_mask.bool()
    diff = (ro.logprobs.double() - logprobs.double()).abs()[mask]
    n = int(diff.numel())
    result = SyncCheck(float(diff.mean()) if n else 0.0, float(diff.max()) if n else 0.0, n)
    if tolerance is not None and not result.mean_abs_diff <= tolerance:  # `not <=` also catches NaN
        raise EngineError(
            f"weight sync check failed: after the sync the rollout engine ({type(engine).__name__}) and the policy "
            f"disagree on a probe of {n} tokens by mean |log μ − log π| = {result.mean_abs_diff:.3g} "
            f"(max {result.max_abs_diff:.3g}) > tolerance {tolerance:g}; the engine is sampling from weights other "
            f"than the policy's (raise rollout.verify_sync if this gap is the engine's precision, e.g. bf16/FP8)")
    return result
