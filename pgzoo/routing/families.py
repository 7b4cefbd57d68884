"""The MoE families pgzoo can record and replay, and how each turns router logits into gate weights.

In transformers 5 every supported family splits an MoE block into a router module (``block.gate``) and an experts
module (``block.experts``)::

    logits = hidden @ W_r.T                               # [T, E]   (router)
    p      = softmax(logits, float32)                     # [T, E]
    w, ids = topk(p, k)                                   # [T, k]
    w      = w / Σ_k w           (when the family renormalises)
    w      = w.to(logits.dtype)  (when the family casts back)
    out    = Σ_j w_j · expert_{ids_j}(hidden)             # (experts)

The router returns ``(logits, w, ids)`` and the experts consume ``(hidden, ids, w)``. Replay substitutes ``ids``
with the forced ids and recomputes ``w`` from the *full* softmax of the current logits gathered at those ids, so
the router keeps its gradient::

    w_forced = gather(p, ids_forced);  w_forced /= Σ_k w_forced  (if renormalising);  cast as the family does

================  ==============================  ======================================  =================
family            router class                    renormalise top-k                       cast to logits dtype
================  ==============================  ======================================  =================
``qwen3_moe``     ``Qwen3MoeTopKRouter``          ``config.norm_topk_prob``               yes
``qwen2_moe``     ``Qwen2MoeTopKRouter``          ``config.norm_topk_prob``               yes
``olmoe``         ``OlmoeTopKRouter``             ``config.norm_topk_prob``               yes
``mixtral``       ``MixtralTopKRouter``           always                                  no (stays float32)
================  ==============================  ======================================  =================

Qwen2-MoE's shared expert (``shared_expert``, gated by ``shared_expert_gate``) is not routed and runs unchanged.
Dense decoder layers between MoE layers (``mlp_only_layers``, ``decoder_sparse_step``) have no router and are
skipped: route tensors hold one slot per *MoE* layer, in depth order (``MoeLayer.layer_index`` maps it back).
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass

import torch

from pgzoo.errors import RoutingError


@dataclass(frozen=True)
class Family:
    """How one model family computes gate weights from router logits (see the module docstring)."""

    name: str
    router_class: str
    renormalize_attr: str | None  # router attribute that switches renormalisation; None means always renormalise
    cast_to_logits_dtype: bool

    def renormalizes(self, router: torch.nn.Module) -> bool:
        return True if self.renormalize_attr is None else bool(getattr(router, self.renormalize_attr))

    def gate_weights(self, router: torch.nn.Module, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Gate weights ``[T, k]`` for expert ids ``[T, k]``, from the full softmax of ``logits`` ``[T, E]``.

        Bit-for-bit what the family's router returns when ``ids`` are its own top-k ids (same gather order, same
        renormalisation, same cast), and differentiable with respect to ``logits``.
        """
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights = probs.gather(-1, ids)
        if self.renormalizes(router):
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.cast_to_logits_dtype:
            weights = weights.to(logits.dtype)
        return weights


FAMILIES: dict[str, Family] = {
    f.router_class: f
    for f in (
        Family("qwen3_moe", "Qwen3MoeTopKRouter", "norm_topk_prob", True),
        Family("qwen2_moe", "Qwen2MoeTopKRouter", "norm_topk_prob", True),
        Family("olmoe", "OlmoeTopKRouter", "norm_topk_prob", True),
        Family("mixtral", "MixtralTopKRouter", None, False),
    )
}
SUPPORTED = tuple(sorted(f.name for f in FAMILIES.values()))


@dataclass(frozen=True)
class MoeLayer:
    """One MoE block of a model: its slot in route tensors, decoder-layer index, modules and sizes."""

    slot: int  # index along the routes' layer axis
    layer_index: int  # decoder layer number (dense layers skipped in ``slot``, not here)
    name: str  # qualified module name of the block
    block: torch.nn.Module
    router: torch.nn.Module
    experts: torch.nn.Module
    family: Family
    num_experts: int
    top_k: int


_LAYER_NUMBER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")
_MOE_HINT = re.compile(r"(router|experts?$|sparsemoe|moeblock|moemlp)", re.IGNORECASE)


def _family_of(module: torch.nn.Module) -> Family | None:
    for cls in type(module).__mro__:
        family = FAMILIES.get(cls.__name__)
        if family is not None:
            return family
    return None


def _unwrap_peft(module):
    """The module a PEFT LoRA wrapper adapts (``ParamWrapper`` on a router or expert parameter, nested when several
    parameters are targeted): hooks go on the inner module, which PEFT calls with the adapted weight."""
    while isinstance(module, torch.nn.Module) and callable(getattr(module, "get_base_layer", None)) \
            and isinstance(getattr(module, "base_layer", None), torch.nn.Module):
        module = module.base_layer
    return module


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def find_moe_layers(model: torch.nn.Module) -> list[MoeLayer]:
    """The MoE blocks of a transformers model, in depth order.

    The result is cached per model object and re-discovered when a block's router module was replaced.

    Raises :class:`~pgzoo.errors.RoutingError` naming the model's class when it has no MoE layer pgzoo knows:
    a dense model, or an MoE family that is not supported (see :data:`SUPPORTED`).
    """
    if not isinstance(model, torch.nn.Module):
        raise RoutingError(f"routing record/replay needs a torch.nn.Module, got {type(model).__name__}")
    cached = _CACHE.get(model)
    if cached is not None and all(
        _unwrap_peft(getattr(layer.block, "gate", None)) is layer.router
        and _unwrap_peft(getattr(layer.block, "experts", None)) is layer.experts
        for layer in cached
    ):
        return list(cached)
    layers = _discover(model)
    _CACHE[model] = tuple(layers)
    return layers


def _discover(model: torch.nn.Module) -> list[MoeLayer]:
    layers: list[MoeLayer] = []
    unknown: list[str] = []
    for name, block in model.named_modules():
        router = _unwrap_peft(getattr(block, "gate", None))
        if isinstance(router, torch.nn.Module) and (family := _family_of(router)) is not None:
            experts = _unwrap_peft(getattr(block, "experts", None))
            if not isinstance(experts, torch.nn.Module):
                raise RoutingError(f"{type(block).__name__} at {name!r} has a {family.router_class} but no `experts`")
            match = _LAYER_NUMBER.search(name)
            layers.append(
                MoeLayer(
                    slot=len(layers),
                    layer_index=int(match.group(1)) if match else len(layers),
                    name=name,
                    block=block,
                    router=router,
                    experts=experts,
                    family=family,
                    num_experts=int(router.num_experts),
                    top_k=int(router.top_k),
                )
            )
        elif name and _MOE_HINT.search(type(block).__name__) and _family_of(block) is None:
            unknown.append(type(block).__name__)
    if not layers:
        cls = type(model).__name__
        if unknown:
            raise RoutingError(
                f"{cls} is an MoE model family pgzoo cannot record/replay (found {sorted(set(unknown))[:4]}); "
                f"supported families: {', '.join(SUPPORTED)} (transformers >= 5 module layout)"
            )
        raise RoutingError(
            f"{cls} has no MoE layers: routing replay applies to MoE models ({', '.join(SUPPORTED)}); "
            f"for a dense model, turn routing replay off (mode None)"
        )
    tops = {(layer.top_k, layer.num_experts) for layer in layers}
    if len({k for k, _ in tops}) != 1:
        raise RoutingError(f"{type(model).__name__}: MoE layers disagree on top_k ({sorted(tops)}); not supported")
    return layers
