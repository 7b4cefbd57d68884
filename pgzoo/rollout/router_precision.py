"""An MoE router computed in lower precision in the rollout engine: the same token routed to other experts.

    handles = lower_router_precision(engine_model, "bfloat16")   # every MoE router of the model
    ...                                                           # generate: routes come from the bf16 router
    for h in handles: h.remove()

The mechanism arXiv 2512.01374 blames for much of the training–inference gap of MoE policies: the inference engine
computes the router logits in its own precision, so a token whose top-k margin is smaller than the rounding error
goes to a different expert set than in the trainer, and the whole layer output changes, not just its last bits.
For a router with weight W_r (``[E, H]``) and input h, the hook replaces the router's output with

    logits = float32( bf16(h) @ bf16(W_r).T )    (a bfloat16 GEMM: rounded inputs, rounded output)
    ids    = topk(softmax(logits), k)
    w      = the family's gate weights at ids   (pgzoo.routing.families: renormalised / cast as the family does)

so expert ids *and* gate weights come from the low-precision logits, while every other layer keeps the engine's
dtype. The hook is a forward hook on the router module, so :func:`pgzoo.routing.record` (installed later, while
generating) sees the low-precision routes: R3 replays what the engine actually did.

Only the transformers engine can do this: vLLM computes the router inside its fused MoE layer in the model's dtype
and has no setting for the router alone, so ``rollout.router_dtype`` is rejected with ``rollout.engine=vllm``.
"""

from __future__ import annotations

import torch

from pgzoo.errors import EngineError

ROUTER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _hook(layer, dtype: torch.dtype):
    family = layer.family

    def hook(module, args, output):
        weight = getattr(module, "weight", None)
        hidden = args[0] if args else None
        if weight is None or hidden is None:
            raise EngineError(f"router_dtype: the router of MoE layer {layer.layer_index} ({type(module).__name__}) "
                              "has no `weight` or input to recompute; use router_dtype=None for this model")
        h = hidden.reshape(-1, weight.shape[-1])
        logits = torch.nn.functional.linear(h.to(dtype), weight.to(dtype)).to(output[0].dtype)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        ids = torch.topk(probs, layer.top_k, dim=-1).indices
        weights = family.gate_weights(module, logits, ids)
        return (logits, weights, ids, *output[3:])

    return hook


def lower_router_precision(model: torch.nn.Module, dtype: str) -> list:
    """Compute every MoE router of ``model`` in ``dtype`` (see the module docstring); returns the hook handles.

    Raises:
        EngineError: an unknown dtype, or a model without MoE layers :mod:`pgzoo.routing` knows.
    """
    if dtype not in ROUTER_DTYPES:
        raise EngineError(f"router_dtype={dtype!r}: choose one of {', '.join(ROUTER_DTYPES)}")
    from pgzoo.errors import RoutingError
    from pgzoo.routing import find_moe_layers

    try:
        layers = find_moe_layers(model)
    except RoutingError as exc:
        raise EngineError(f"router_dtype={dtype!r} needs an MoE model: {exc}") from None
    return [layer.router.register_forward_hook(_hook(layer, ROUTER_DTYPES[dtype])) for layer in layers]
