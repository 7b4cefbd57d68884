"""Local tiny policies (MoE and dense) with a character tokenizer; cold-start SFT lives in ``cold_start``."""

from pgzoo.models.paper import build_paper_moe, paper_moe_config
from pgzoo.models.tiny import (
    build_tiny_dense,
    build_tiny_moe,
    build_tokenizer,
    fresh_tiny_checkpoint,
    load_pretrained,
    read_card,
    save_pretrained,
    tiny_dense_config,
    tiny_moe_config,
)

__all__ = [
    "build_paper_moe",
    "paper_moe_config",
    "build_tiny_dense",
    "build_tiny_moe",
    "build_tokenizer",
    "fresh_tiny_checkpoint",
    "load_pretrained",
    "read_card",
    "save_pretrained",
    "tiny_dense_config",
    "tiny_moe_config",
    "ensure_cold_start",
]


def __getattr__(name):  # lazy: cold_start imports the task registry
    if name == "ensure_cold_start":
        from pgzoo.models.cold_start import ensure_cold_start

        return ensure_cold_start
    raise AttributeError(name)
