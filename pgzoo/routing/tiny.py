"""Tiny, locally built models of every supported MoE family, for tests and benchmarks (nothing is downloaded).

    from pgzoo.routing.tiny import build_tiny_family
    model = build_tiny_family("qwen2_moe", seed=0, decoder_sparse_step=2)   # dense layers 0, 2 between MoE 1, 3
"""

from __future__ import annotations

from typing import Any

from pgzoo.errors import UnknownNameError, require

_COMMON = dict(
    vocab_size=100,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

TINY_FAMILY_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(intermediate_size=96, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
             norm_topk_prob=True, router_aux_loss_coef=0.0),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=8,
             num_experts_per_tok=2, norm_topk_prob=False, router_aux_loss_coef=0.0),
    ),
    "mixtral": (
        "MixtralConfig",
        dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.0),
    ),
    "olmoe": (
        "OlmoeConfig",
        dict(intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
             router_aux_loss_coef=0.0),
    ),
}


def tiny_family_config(family: str, **overrides: Any):
    """A small transformers config of ``family`` (one of :data:`TINY_FAMILY_CONFIGS`), ``overrides`` applied."""
    transformers = require("transformers", "hf")
    if family not in TINY_FAMILY_CONFIGS:
        raise UnknownNameError("MoE family", family, TINY_FAMILY_CONFIGS)
    cls_name, params = TINY_FAMILY_CONFIGS[family]
    config = getattr(transformers, cls_name)(**{**_COMMON, **params, **overrides})
    return config


def build_tiny_family(family: str, seed: int = 0, dtype=None, **overrides: Any):
    """A freshly initialised tiny ``*ForCausalLM`` of ``family`` in eval mode (deterministic for ``seed``)."""
    torch = require("torch", "hf")
    transformers = require("transformers", "hf")
    config = tiny_family_config(family, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
        # Default init leaves routers near zero (near-uniform routing, many near-ties); give them real preferences.
        for module in model.modules():
            if type(module).__name__.endswith("TopKRouter"):
                torch.nn.init.normal_(module.weight, std=0.5)
    return model.eval()
