"""The TRL adapter accepts TRL's loss settings (mapped onto the objective) and trains 2 steps with each on the tiny
MoE; the loss each step optimises is the mapped objective's (its metrics are logged)."""

from __future__ import annotations

import copy
import math
import os

import pytest

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
pytest.importorskip("trl")


datasets = pytest.importorskip("datasets")
trl_adapter = pytest.importorskip("pgzoo.adapters.trl")
from trl import GRPOConfig  # noqa: E402

from _trl_fixtures import PROMPTS, base_moe, tok  # noqa: E402,F401  (fixtures)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def reward_digits(completions, **kwargs):
    return [float(sum(ch.isdigit() for ch in c[:4])) for c in completions]


CASES = {
    # loss=None: TRL's loss_type becomes the objective
    "bnpo": (None, dict(loss_type="bnpo"), "bnpo", {}),
    "sapo": (None, dict(loss_type="sapo", sapo_temperature_neg=1.2), "sapo", {"temperature_neg": 1.2}),
    "luspo": (None, dict(loss_type="luspo", importance_sampling_level="sequence"), "luspo", {}),
    "vespo": (None, dict(loss_type="vespo", vespo_k_pos=1.5), "vespo", {"k_pos": 1.5}),
    "cispo": (None, dict(loss_type="cispo", epsilon_high=5.0), "cispo", {"eps_high": 4.0}),
    # a given objective takes the loss-shaping settings
    "entropy-mask": ("grpo", dict(top_entropy_quantile=0.5), "grpo", {"top_entropy_quantile": 0.5}),
    "off-policy-mask": ("dapo", dict(off_policy_mask_threshold=0.5), "dapo", {"off_policy_mask_threshold": 0.5}),
    "delta": ("grpo", dict(delta=2.0), "grpo", {"delta": 2.0}),
    "entropy-coef": ("bnpo", dict(entropy_coef=0.01), "bnpo", {"entropy_coef": 0.01}),
    "beta": ("grpo", dict(beta=0.04, use_bias_correction_kl=True), "grpo", {"beta": 0.04, "bias_correction_kl": True}),
    "sequence-level": ("sapo", dict(importance_sampling_level="sequence"), "sapo",
                       {"importance_sampling_level": "sequence"}),
}


@pytest.mark.slow  # a TRL training run per setting
@pytest.mark.parametrize("case", list(CASES))
def test_trl_setting_is_accepted_and_trains(case, tmp_path, base_moe, tok):
    loss, settings, name, options = CASES[case]
    args = GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=6, gradient_accumulation_steps=1, max_steps=2, learning_rate=1e-2,
                      logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", bf16=False, seed=0, **settings)
    model = copy.deepcopy(base_moe)
    if args.beta != 0:  # TRL loads its reference model from the policy's path
        model = str(tmp_path / "policy")
        base_moe.save_pretrained(model)
    trainer = trl_adapter.GRPOTrainer(loss=loss, model=model, reward_funcs=reward_digits, args=args,
                                      train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}),
                                      processing_class=tok)
    obj = trainer.objective
    assert obj.name == name and {k: getattr(obj.config, k) for k in options} == options
    trainer.train()
    steps = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    assert len(steps) == 2 and all(math.isfinite(h["loss"]) for h in steps)
    assert all("pgzoo/ratio/mean" in h for h in steps)
    if "beta" in options:
        assert all("pgzoo/kl/ref_k3" in h for h in steps)
    if "top_entropy_quantile" in options:
        assert all(0 < h["pgzoo/shaping/entropy_kept_fraction"] <= 1 for h in steps)
    if "entropy_coef" in options:
        assert all(h["pgzoo/shaping/entropy_bonus"] > 0 for h in steps)
