"""The paper-shaped MoE: Qwen3-30B-A3B's structure (128 experts, top-8, its width ratios) at hidden 256, 4 layers."""

from __future__ import annotations

import torch

from pgzoo.models import build_paper_moe, build_tokenizer, paper_moe_config
from pgzoo.models.paper import QWEN3_30B_A3B


def test_the_paper_moe_keeps_qwen3_30b_a3b_ratios():
    c = paper_moe_config(len(build_tokenizer()))
    p = QWEN3_30B_A3B
    assert type(c).__name__ == "Qwen3MoeConfig"
    assert (c.num_experts, c.num_experts_per_tok) == (p["num_experts"], p["num_experts_per_tok"]) == (128, 8)
    assert c.intermediate_size / c.hidden_size == p["intermediate_size"] / p["hidden_size"] == 3
    assert c.moe_intermediate_size / c.hidden_size == p["moe_intermediate_size"] / p["hidden_size"] == 3 / 8
    q_width = c.num_attention_heads * c.head_dim
    assert q_width / c.hidden_size == p["num_attention_heads"] * p["head_dim"] / p["hidden_size"] == 2
    assert c.num_attention_heads / c.num_key_value_heads == p["num_attention_heads"] / p["num_key_value_heads"]
    assert c.head_dim == 64 and c.hidden_size == 256 and c.num_hidden_layers == 4 and not c.tie_word_embeddings
    assert c.mlp_only_layers == [] and c.decoder_sparse_step == 1


def test_the_paper_moe_builds_deterministically_with_the_documented_size():
    vocab = len(build_tokenizer())
    a, b = build_paper_moe(vocab, seed=0), build_paper_moe(vocab, seed=0)
    assert sum(p.numel() for p in a.parameters()) == 39_113_472  # docs/embedded.md
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with torch.no_grad():
        logits = a(torch.tensor([[1, 20, 21, 22]])).logits
    assert logits.shape == (1, 4, vocab) and torch.isfinite(logits).all()
