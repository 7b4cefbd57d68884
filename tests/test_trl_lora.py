"""TRL's GRPOTrainer with a LoRA policy (``peft_config``) and pgzoo rollout engines: every sync hands the engine the
effective weights W + (α/r)·B·A, so the parity probe passes at float32 precision after each LoRA update."""

from __future__ import annotations

import copy
import importlib.util
import os

import pytest

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
pytest.importorskip("trl")
peft = pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")
pytest.importorskip("pgzoo.adapters.trl")

import pgzoo  # noqa: E402
from pgzoo.adapters.trl import EngineRollout, GRPOTrainer  # noqa: E402
from pgzoo.errors import EngineError  # noqa: E402
from pgzoo.rollout import TransformersEngine  # noqa: E402

from _trl_fixtures import PROMPTS, base_moe, tok  # noqa: E402,F401  (fixtures)
from test_train_lora import SkipAdapterEngine  # noqa: E402
from test_trl_training import config, reward_digits  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def lora_config(**overrides):
    params = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "o_proj"],
                  target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"])
    params.update(overrides)
    return peft.LoraConfig(**params)


def train_lora(tmp_path, base, tok, rollout, peft_config=None, **cfg):
    trainer = GRPOTrainer(
        loss=pgzoo.get("minirl"),
        model=copy.deepcopy(base),
        reward_funcs=reward_digits,
        args=config(tmp_path, **{"max_steps": 2, "learning_rate": 5e-2, **cfg}),
        train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=tok,
        peft_config=peft_config or lora_config(),
        rollout_func=rollout,
    )
    trainer.train()
    steps = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    return trainer, steps


def adapter_moved(trainer) -> float:
    return max(float(p.detach().abs().max()) for n, p in trainer.model.named_parameters() if "lora_B" in n)


def test_lora_grpo_with_a_transformers_engine(tmp_path, base_moe, tok):
    rollout = EngineRollout(TransformersEngine(copy.deepcopy(base_moe)), verify_sync=1e-5)
    trainer, steps = train_lora(tmp_path, base_moe, tok, rollout)
    assert isinstance(trainer.model, peft.PeftModel) and adapter_moved(trainer) > 0  # LoRA B left zero init
    assert rollout.syncs == 2 and rollout.last_sync_check.mean_abs_diff < 1e-5
    for h in steps:
        assert h["pgzoo/sync/logprob_abs_diff_mean"] < 1e-5
        assert h["pgzoo/log_ratio/train_inference_abs_mean"] < 1e-4  # μ is π_θold of the LoRA policy


def test_a_sync_without_the_adapter_is_caught(tmp_path, base_moe, tok):
    rollout = EngineRollout(SkipAdapterEngine(TransformersEngine(copy.deepcopy(base_moe))), verify_sync=1e-5)
    with pytest.raises(EngineError, match="weight sync check failed"):
        train_lora(tmp_path, base_moe, tok, rollout, max_steps=3)


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
def test_lora_grpo_with_vllm_on_cpu(tmp_path, base_moe, tok):
    from pgzoo.rollout import VLLMEngine

    path = tmp_path / "ckpt"
    base_moe.save_pretrained(path)
    tok.save_pretrained(path)
    engine = VLLMEngine(path, dtype="float32", gpu_memory_utilization=0.05, max_model_len=64)
    try:
        rollout = EngineRollout(engine, verify_sync=1e-5)
        trainer, steps = train_lora(tmp_path, base_moe, tok, rollout,
                                    peft_config=lora_config(lora_dropout=0.1, target_parameters=None))
    finally:
        engine.close()
    assert adapter_moved(trainer) > 0
    assert engine.num_syncs == rollout.syncs == 2
    for h in steps:
        # the probe runs the policy in eval mode, where LoRA dropout is off: the engine has exactly W + (α/r)·B·A
        assert h["pgzoo/sync/logprob_abs_diff_mean"] < 1e-5
        # (the trainer's own train-mode forward drops adapter inputs at random, so its π is not μ token by token)
        assert 0 < h["pgzoo/log_ratio/train_inference_abs_mean"] < 0.5
