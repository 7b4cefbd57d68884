"""A paper-shaped MoE: Qwen3-30B-A3B's structure scaled down to run on a laptop CPU.

The recipes in ``recipes/paper/`` pin Qwen3-30B-A3B (Qwen3-MoE: 48 layers, hidden 2048, 128 experts with top-8
routing, expert intermediate 768, 32 query / 4 key-value heads of dimension 128). :func:`build_paper_moe` keeps what
makes the sharded and routed code paths behave like that model — the same config class, 128 experts, top-8, the
ratios

    intermediate / hidden = 3,   expert intermediate / hidden = 3/8,   query width / hidden = 2,   query / KV heads = 8,

an untied LM head, RMSNorm eps 1e-6 and q/k norms — and shrinks the width to hidden 256 and the depth to 4 layers.
Head dimension is 64 instead of 128 (vLLM's CPU attention serves 64), so 8 query heads and 1 KV head give the
paper's query width of 2 x hidden. 39,113,472 parameters (156 MB in float32), 3.7 M of them active per token.

    from pgzoo.models import build_paper_moe, build_tokenizer
    model = build_paper_moe(vocab_size=len(build_tokenizer()), seed=0)
"""

from __future__ import annotations

from typing import Any

from pgzoo.errors import require
from pgzoo.models.tiny import CHARACTERS, SPECIAL_TOKENS, build_from_config

# Qwen3-30B-A3B's config.json, for the record of what is scaled (only the ratios are used below).
QWEN3_30B_A3B: dict[str, Any] = dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                                     num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                                     head_dim=128, num_experts=128, num_experts_per_tok=8)

PAPER_MOE_DEFAULTS: dict[str, Any] = dict(
    hidden_size=256,
    intermediate_size=768,  # 3 x hidden (unused while every layer is sparse, as in the paper's model)
    moe_intermediate_size=96,  # 3/8 x hidden; a multiple of 32, so vLLM's CPU MoE kernel needs no padding
    num_hidden_layers=4,
    num_attention_heads=8,  # 8 x 64 = 512 = 2 x hidden, the paper's query width
    num_key_value_heads=1,  # 8 query heads per KV head, the paper's 32 / 4
    head_dim=64,
    num_experts=128,
    num_experts_per_tok=8,
    norm_topk_prob=True,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    max_position_embeddings=256,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    router_aux_loss_coef=0.0,
    output_router_logits=False,
)


def paper_moe_config(vocab_size: int | None = None, **overrides: Any):
    """A ``Qwen3MoeConfig`` with :data:`PAPER_MOE_DEFAULTS` (Qwen3-30B-A3B's shape at hidden 256), ``overrides``
    applied."""
    transformers = require("transformers", "hf")
    params = {**PAPER_MOE_DEFAULTS, **overrides}
    params["vocab_size"] = vocab_size or params.get("vocab_size") or len(SPECIAL_TOKENS) + len(CHARACTERS)
    params.setdefault("pad_token_id", 0)
    params.setdefault("bos_token_id", 1)
    params.setdefault("eos_token_id", 2)
    return transformers.Qwen3MoeConfig(**params)


def build_paper_moe(vocab_size: int | None = None, seed: int = 0, **overrides: Any):
    """A freshly initialised paper-shaped ``Qwen3MoeForCausalLM`` (deterministic for ``seed``; the global RNG is left
    alone)."""
    return build_from_config(paper_moe_config(vocab_size, **overrides), seed)
