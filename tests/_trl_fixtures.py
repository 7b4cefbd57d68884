"""Fixtures shared by the TRL adapter tests: the character tokenizer, the tiny MoE built for it, and the prompts."""

from __future__ import annotations

import pytest

from pgzoo.models import build_tiny_moe, build_tokenizer

PROMPTS = [f"{a}+{b}=" for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4), (6, 1), (9, 9)]]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def base_moe(tok):
    return build_tiny_moe(vocab_size=len(tok), seed=0)
