"""The weights a PEFT LoRA policy computes with, under the base model's names, without touching the policy.

A LoRA-adapted weight (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") acts as

    W_eff = W + Σ_a s_a · B_a A_a,      s_a = α_a / r_a   (α_a / √r_a with rsLoRA)

summed over the layer's active adapters ``a`` that are not already merged into ``W``. An inference engine that
knows nothing of adapters samples from the LoRA policy when it is given ``W_eff`` under the name of ``W``. This
module maps a PEFT-wrapped model's tensors to those names and computes ``W_eff`` module by module with PEFT's own
``get_delta_weight`` (the function PEFT's ``merge`` adds to the weight), into a new tensor: nothing is merged or
unmerged in place and the model is never copied, so the trainable model is bit-identical before and after.

What PEFT defines, kept as it defines it:

* **dropout** (``lora_dropout``) acts on the adapter's input during training only; in eval mode — how an engine
  samples — the layer computes ``W_eff x`` exactly, so dropout adds nothing to the synced weight.
* **modules_to_save**: the active adapter's trained copy (``<module>.modules_to_save.<adapter>``) is sent under
  the module's name; the frozen ``original_module`` only when adapters are disabled.
* **disabled adapters** (``with model.disable_adapter():``) sync the base weights, which is what the model then
  computes.
* **target_parameters** (``ParamWrapper``: LoRA on a raw parameter, e.g. Qwen3-MoE's fused
  ``mlp.experts.gate_up_proj`` / ``down_proj`` and the router's ``mlp.gate.weight``, nested when a module has
  several) are merged the same way, so adapters on experts and routers reach the engine and routing replay sees the
  adapted router.

DoRA, ``lora_bias`` and non-LoRA PEFT tuners are refused with :class:`~pgzoo.errors.EngineError` (their effective
weight is not ``W + s·BA``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pgzoo.errors import EngineError


def is_peft_model(model: torch.nn.Module) -> bool:
    """True for a ``peft.PeftModel`` (or anything shaped like it: ``peft_config`` and ``base_model.model``)."""
    return hasattr(model, "peft_config") and isinstance(getattr(getattr(model, "base_model", None), "model", None),
                                                        torch.nn.Module)


@dataclass
class Source:
    """One tensor the engine receives: ``name`` (the base model's ``state_dict`` name), the model's own tensor
    ``tensor`` (possibly a DTensor shard), and ``deltas``: callables returning the LoRA deltas to add to it."""

    name: str
    tensor: torch.Tensor
    deltas: tuple[Callable[[], torch.Tensor], ...] = ()


def plain_sources(model: torch.nn.Module) -> list[Source]:
    """The ``state_dict`` tensors of a model without adapters, as :class:`Source` (no copies: the model's tensors)."""
    return [Source(k, v) for k, v in model.state_dict(keep_vars=True).items()]


def peft_sources(peft_model: torch.nn.Module, *, adapters: bool = True) -> tuple[torch.nn.Module, list[Source]]:
    """``(base transformers model, sources)`` of a PEFT model: every tensor of the base model under its own name,
    LoRA deltas attached to the tensors they adapt, adapter tensors themselves left out.

    ``adapters=False`` attaches no deltas: the base weights (a control for tests, or to sync the frozen reference).
    """
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = peft_model.base_model.model
    adapted: dict[int, list] = {}  # id(tensor adapted) -> LoRA layers adapting it
    adapter_tensors: set[int] = set()
    wrappers: dict[str, torch.nn.Module] = {}  # modules_to_save wrappers by module name
    for name, module in base.named_modules():
        if type(module).__name__ == "ModulesToSaveWrapper":
            wrappers[name] = module
            continue
        if not isinstance(module, BaseTunerLayer):
            continue
        if not isinstance(module, LoraLayer):
            raise EngineError(f"weight sync: {name} is a {type(module).__name__} PEFT layer; pgzoo syncs LoRA "
                              f"adapters only (merge other tuners with model.merge_and_unload() and sync that)")
        for attr in (*module.adapter_layer_names, *module.other_param_names):
            holder = getattr(module, attr, None)
            if isinstance(holder, torch.nn.Module):
                adapter_tensors.update(id(t) for t in (*holder.parameters(), *holder.buffers()))
        _refuse_variants(name, module)
        target = module.get_param() if hasattr(module, "get_param") else module.get_base_layer().weight
        adapted.setdefault(id(target), []).append(module)

    sources = []
    for key, tensor in base.state_dict(keep_vars=True).items():
        if id(tensor) in adapter_tensors:
            continue
        name = _base_name(key, wrappers)
        if name is None:
            continue
        deltas: tuple = ()
        if adapters:
            deltas = tuple(_delta_fn(layer, a) for layer in adapted.get(id(tensor), ()) if not layer.disable_adapters
                           for a in layer.active_adapters if a in layer.r and a not in layer.merged_adapters)
        sources.append(Source(name, tensor, deltas))
    return base, sources


def _delta_fn(layer, adapter: str) -> Callable[[], torch.Tensor]:
    return lambda: layer.get_delta_weight(adapter)


def _refuse_variants(name: str, layer) -> None:
    for adapter in layer.active_adapters:
        if getattr(layer, "use_dora", {}).get(adapter, False):
            raise EngineError(f"weight sync: {name} uses DoRA (adapter {adapter!r}), whose effective weight is not "
                              f"W + s*B*A; sync a merged copy (model.merge_and_unload()) or train without DoRA")
        if getattr(layer, "lora_bias", {}).get(adapter, False):
            raise EngineError(f"weight sync: {name} has lora_bias=True (adapter {adapter!r}), which changes the "
                              f"bias; train with lora_bias=False")


def _base_name(key: str, wrappers: dict[str, torch.nn.Module]) -> str | None:
    """The base model's name for a PEFT ``state_dict`` key (``base_layer`` segments dropped, ``modules_to_save``
    resolved to the copy the model computes with), or None for a tensor the model does not compute with."""
    parts = key.split(".")
    for prefix, wrapper in wrappers.items():
        head = prefix.split(".") if prefix else []
        if parts[: len(head)] != head or len(parts) <= len(head):
            continue
        rest = parts[len(head):]
        active = [a for a in wrapper.active_adapters if a in wrapper.modules_to_save]
        use_copy = bool(active) and not wrapper.disable_adapters
        if rest[0] == "original_module":
            parts = head + rest[1:] if not use_copy else None
        elif rest[0] == "modules_to_save" and len(rest) > 2:
            parts = head + rest[2:] if use_copy and rest[1] == active[0] else None
        if parts is None:
            return None
    return ".".join(p for p in parts if p != "base_layer")
