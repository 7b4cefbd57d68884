"""LoRA in the Lightning trainer: the recipe's ``model.lora`` as a PEFT policy, its checkpoints and its resume.

A LoRA policy (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") computes with

    W_eff = W + (alpha / r) · B A          (alpha / sqrt(r) with ``use_rslora``)

on every targeted module (``target_modules``) and raw parameter (``target_parameters``, e.g. Qwen3-MoE's fused
experts); W stays frozen and only A, B (and the modules in ``modules_to_save``) are trained, so only they are in the
optimizer. PEFT does the wrapping (``get_peft_model``) and the adapter files (``save_pretrained`` /
``PeftModel.from_pretrained``); the rollout engine receives W_eff through :func:`pgzoo.rollout.sync.sync_weights`.

A checkpoint of a LoRA run (``checkpoints/step-XXXXXX/``) is

    config.json, model.safetensors, tokenizer   the MERGED model (W_eff under the base names): plain transformers
                                                loads it, the rollout engine starts from it
    adapter/                                    the adapter in PEFT's format (adapter_config.json,
                                                adapter_model.safetensors): PeftModel.from_pretrained(base, adapter/)
    trainer_state.pt                            optimizer over the adapter parameters, ``lora_base`` (the base path)

``--resume`` rebuilds the policy exactly: the frozen base weights from the base model the run started from
(``model.path``, or the embedded model's cold start; recorded as ``lora_base`` and checked), the adapter from
``adapter/``. It does not start from the merged folder: W_eff - B·A does not give back W bit for bit in floating
point, and the run would no longer be the uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pgzoo.errors import ConfigError, require
from pgzoo.rollout.lora import is_peft_model

ADAPTER_DIR = "adapter"


def lora_config(section):
    """PEFT's ``LoraConfig`` of a recipe's ``model.lora`` section (:class:`pgzoo.recipes.sections.LoraSection`)."""
    peft = require("peft", "hf")
    try:
        return peft.LoraConfig(r=section.r, lora_alpha=section.alpha, lora_dropout=section.dropout,
                               target_modules=section.target_modules or None,
                               target_parameters=section.target_parameters or None,
                               modules_to_save=section.modules_to_save or None, use_rslora=section.use_rslora,
                               bias="none", task_type="CAUSAL_LM")
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"model.lora: PEFT refuses this LoraConfig ({exc}); fix the model.lora keys") from None


def _matches(key: str, name: str) -> bool:
    """PEFT's rule for a module or parameter name given as a string: the full name, or a suffix after a dot."""
    return key == name or key.endswith("." + name)


def check_targets(policy: torch.nn.Module, section) -> None:
    """Every name of ``target_modules`` (a list), ``target_parameters`` and ``modules_to_save`` must match something
    in ``policy``: PEFT only checks that *some* target matched, so ``[q_proj, v_prj]`` would train q_proj alone. A
    module to save must not be one of two tied tensors (input embeddings and LM head): PEFT trains a copy of it, so
    the policy's two would come apart while the rollout engine, which loads one shared tensor, keeps computing with
    the other."""
    from pgzoo.errors import suggest

    peft = require("peft", "hf")
    modules = [name for name, _ in policy.named_modules() if name]
    params = [name for name, _ in policy.named_parameters()]
    short = sorted({m.rsplit(".", 1)[-1] for m in modules})
    if isinstance(section.target_modules, list):
        from peft.tuners.tuners_utils import check_target_module_exists

        for name in section.target_modules:
            config = peft.LoraConfig(target_modules=[name])
            if not any(check_target_module_exists(config, key) for key in modules):
                raise ConfigError(f"model.lora.target_modules: {name!r} matches no module of the policy."
                                  f"{suggest(name, short)} Every name must match (PEFT only checks that one does)")
    for name in section.target_parameters:
        if not any(_matches(key, name) for key in params):
            options = sorted({p.split(".", 2)[-1] if p.count(".") > 1 else p for p in params})
            raise ConfigError(f"model.lora.target_parameters: {name!r} matches no parameter of the policy."
                              f"{suggest(name, options)} Give a parameter's name or its suffix, e.g. "
                              "mlp.experts.gate_up_proj")
    tied = _tied_modules(policy)
    for name in section.modules_to_save:
        found = [key for key in modules if _matches(key, name)]
        if not found:
            raise ConfigError(f"model.lora.modules_to_save: {name!r} matches no module of the policy."
                              f"{suggest(name, short)}")
        both = [key for key in found if key in tied]
        if both:
            other = tied[both[0]]
            raise ConfigError(f"model.lora.modules_to_save: {name!r} ({both[0]}) shares its weight with {other} "
                              "(tied input and output embeddings): a trained copy of one would untie them in the "
                              "policy while the rollout engine keeps one shared tensor, so the two would drift apart. "
                              "Leave it out (the adapters train the rest), or use a model with untied embeddings")


def _tied_modules(policy: torch.nn.Module) -> dict[str, str]:
    """``{module name: the other module's name}`` for the input embeddings and the LM head when they share a weight."""
    get_in, get_out = getattr(policy, "get_input_embeddings", None), getattr(policy, "get_output_embeddings", None)
    if get_in is None or get_out is None:
        return {}
    emb, head = get_in(), get_out()
    if emb is None or head is None or getattr(emb, "weight", None) is not getattr(head, "weight", 1):
        return {}
    names = {id(m): n for n, m in policy.named_modules()}
    a, b = names.get(id(emb)), names.get(id(head))
    return {a: b, b: a} if a and b else {}


def wrap_policy(policy: torch.nn.Module, section) -> torch.nn.Module:
    """``policy`` wrapped with fresh LoRA adapters (B = 0: the wrapped policy computes exactly what ``policy``
    did); base parameters frozen. Every target must match (:func:`check_targets`)."""
    import warnings

    peft = require("peft", "hf")
    check_targets(policy, section)
    try:
        with warnings.catch_warnings():  # PEFT notes its own internal per-parameter patterns for target_parameters
            warnings.filterwarnings("ignore", message=".*_pattern keys did not match any targeted module.*")
            return peft.get_peft_model(policy, lora_config(section))
    except ValueError as exc:  # PEFT: a target that matches nothing, a module type it cannot adapt, ...
        raise ConfigError(f"model.lora: {exc}. Pick model.lora.target_modules / target_parameters among the "
                          f"policy's module names (e.g. [q_proj, v_proj] or all-linear)") from None


def load_lora_policy(section, base_path: Path, ckpt: Path | None, dtype: str, load_policy):
    """``(policy, tokenizer)`` of a LoRA run: the base model from ``base_path`` (``load_policy(path, dtype)``),
    wrapped with fresh adapters, or with the adapters of checkpoint ``ckpt`` (trainable) on ``--resume``."""
    policy, tokenizer = load_policy(base_path, dtype)
    if ckpt is None:
        return wrap_policy(policy, section).eval(), tokenizer
    state = torch.load(Path(ckpt) / "trainer_state.pt", weights_only=False, map_location="cpu", mmap=True)
    adapter = Path(ckpt) / ADAPTER_DIR
    if not (adapter / "adapter_config.json").is_file():
        raise ConfigError(f"{ckpt} holds no LoRA adapter ({ADAPTER_DIR}/): it was written by a full fine-tuning "
                          f"run; resume it without model.lora (model.lora=null), or start a new run folder")
    recorded = state.get("lora_base")
    if recorded is not None and Path(recorded).resolve() != Path(base_path).resolve():
        raise ConfigError(f"{ckpt} was trained on the base model {recorded}, but this run's base is {base_path}; "
                          f"resume with model.path={recorded}")
    saved = require("peft", "hf").PeftConfig.from_pretrained(str(adapter))
    want = lora_config(section)
    # PEFT saves the resolved targets ('all-linear' expanded, internal parameter names added): compare what the
    # recipe fixes exactly — rank, scale, an explicit module list
    keys = ["r", "lora_alpha", "use_rslora"] + (["target_modules"] if isinstance(section.target_modules, list) else [])
    for key in keys:
        a, b = getattr(saved, key, None), getattr(want, key, None)
        if (set(a) if isinstance(a, (set, list)) else a) != (set(b) if isinstance(b, (set, list)) else b):
            raise ConfigError(f"{ckpt}: its adapter has {key}={a!r} but the recipe's model.lora gives {b!r}; resume "
                              f"with the recipe the run was started with")
    from peft import PeftModel

    return PeftModel.from_pretrained(policy, str(adapter), is_trainable=True).eval(), tokenizer


def trainable_parameters(policy: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters the optimizer updates: all of a fully fine-tuned policy, the adapters (and
    ``modules_to_save`` copies) of a LoRA one."""
    return [p for p in policy.parameters() if p.requires_grad]


def base_model(policy: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PEFT policy (the policy itself otherwise)."""
    return policy.base_model.model if is_peft_model(policy) else policy


def effective_state_dict(policy: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights ``policy`` computes with under the base model's ``state_dict`` names: W + (alpha/r)·B·A for a LoRA
    policy (new tensors; the policy is not changed), on rank 0 (empty on the others). Collective under FSDP2:
    every rank calls it."""
    from pgzoo.adapters.lightning.distributed import full_state_dict, world
    from pgzoo.rollout.sync import iter_sync_tensors

    if not is_peft_model(policy):
        return full_state_dict(policy)
    keep = world()[1] == 0
    out = {}
    for name, tensor in iter_sync_tensors(policy, names="module"):
        if keep:
            out[name] = tensor.cpu() if tensor.device.type != "cpu" else tensor
    return out


def save_lora(policy: torch.nn.Module, folder: Path, state_dict: dict | None, merged: dict) -> None:
    """Rank 0: the adapter in PEFT's format under ``folder/adapter`` (``state_dict``: the PEFT model's gathered full
    state under FSDP, else None) and the merged model ``merged`` as a Hugging Face folder in ``folder``."""
    policy.save_pretrained(folder / ADAPTER_DIR, safe_serialization=True, state_dict=state_dict)
    base_model(policy).save_pretrained(folder, safe_serialization=True, state_dict=merged)


__all__ = ["ADAPTER_DIR", "lora_config", "wrap_policy", "load_lora_policy", "trainable_parameters", "base_model",
           "effective_state_dict", "save_lora"]
