"""LoRA targets in the Lightning trainer: every name must match (PEFT only checks that one does), and a module to
save that is one of two tied weights is refused with the reason."""

from __future__ import annotations

import pytest
import torch

from pgzoo.adapters.lightning.lora import check_targets, wrap_policy
from pgzoo.errors import ConfigError
from pgzoo.models import build_tiny_dense, build_tiny_moe, build_tokenizer
from pgzoo.recipes.sections import LoraSection

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def moe():
    return build_tiny_moe(vocab_size=len(build_tokenizer()), seed=0)


def section(**kw) -> LoraSection:
    return LoraSection(**{"r": 4, "alpha": 8, **kw})


def test_every_target_module_must_match(moe):
    with pytest.raises(ConfigError, match=r"target_modules: 'v_prj' matches no module.*Did you mean 'v_proj'"):
        wrap_policy(moe, section(target_modules=["q_proj", "v_prj"]))
    check_targets(moe, section(target_modules=["q_proj", "v_proj", "self_attn.o_proj"]))  # suffixes as PEFT takes them
    check_targets(moe, section(target_modules="all-linear"))


def test_every_target_parameter_and_module_to_save_must_match(moe):
    experts = [n for n, _ in moe.named_parameters() if "experts" in n]
    assert experts, "the tiny MoE keeps its experts as fused parameters"
    suffix = experts[0].split(".", 2)[-1]
    check_targets(moe, section(target_parameters=[suffix]))
    with pytest.raises(ConfigError, match=r"target_parameters: 'mlp.experts.gate_up_prj' matches no parameter"):
        check_targets(moe, section(target_parameters=["mlp.experts.gate_up_prj"]))
    with pytest.raises(ConfigError, match=r"modules_to_save: 'lm_haed' matches no module.*Did you mean 'lm_head'"):
        check_targets(moe, section(modules_to_save=["lm_haed"]))


def test_a_tied_module_to_save_is_refused_with_the_reason(moe):
    assert moe.get_output_embeddings().weight is moe.get_input_embeddings().weight  # the tiny MoE ties them
    for name in ("lm_head", "embed_tokens"):
        with pytest.raises(ConfigError, match=r"shares its weight with .*tied input and output embeddings"):
            wrap_policy(moe, section(modules_to_save=[name]))


def test_an_untied_head_may_be_saved():
    dense = build_tiny_dense(vocab_size=len(build_tokenizer()), seed=0, tie_word_embeddings=False)
    assert dense.get_output_embeddings().weight is not dense.get_input_embeddings().weight
    wrapped = wrap_policy(dense, section(target_modules=["q_proj"], modules_to_save=["lm_head"]))
    trained = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert any("lm_head.modules_to_save" in n for n in trained) and any("lora_A" in n for n in trained)
    assert torch.is_tensor(next(wrapped.parameters()))
