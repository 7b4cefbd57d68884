"""Local tiny policies (MoE and dense) with a character tokenizer; cold-start SFT lives in ``cold_start``."""

from pgzoo.models.tiny import (
    build_tiny_dense,
    build_tiny_moe,
    build_tokenizer,
    save_pretrained,
    tiny_dense_config,
    tiny_moe_config,
)

__all__ = [
    "build_tiny_dense",
    "build_tiny_moe",
    "build_tokenizer",
    "save_pretrained",
    "tiny_dense_config",
    "tiny_moe_config",
]
