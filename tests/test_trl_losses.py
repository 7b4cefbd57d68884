"""Every TRL 1.16 loss type equals its pgzoo objective, gradient for gradient, on identical tensors.

TRL's own ``GRPOTrainer._compute_loss`` runs on a minimal stand-in trainer (no model: the per-token logprobs and
entropies are leaves handed back by a stubbed ``_get_per_token_logps_and_entropies``); pgzoo's objective comes from
the same ``GRPOConfig`` through :func:`pgzoo.adapters.trl.config.objective_from_trl`, so the mapping the TRL adapter
uses is what is checked. Single process, no gradient accumulation: TRL's per-micro-batch denominators are then this
batch's own counts, which are pgzoo's defaults (``max_tokens`` = TRL's ``max_completion_length``).
"""

from __future__ import annotations

import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
pytest.importorskip("trl")
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

import pgzoo  # noqa: E402
from pgzoo.adapters.trl.config import apply_trl_settings, objective_from_trl, trl_options  # noqa: E402
from pgzoo.errors import ConfigError  # noqa: E402

B, T, MAX_LEN = 6, 9, 12


class _Accelerator:
    num_processes = 1
    sync_gradients = True

    @staticmethod
    def pad_across_processes(x, dim=0, pad_index=0):
        return x

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather

    @staticmethod
    def reduce(x, reduction="sum"):
        return x


def trl_config(**kw) -> GRPOConfig:
    params = dict(output_dir="/tmp/pgzoo-trl-losses", use_cpu=True, report_to=[], per_device_train_batch_size=B,
                  num_generations=2, max_completion_length=MAX_LEN, bf16=False)
    params.update(kw)
    return GRPOConfig(**params)


def stand_in(args: GRPOConfig, lp: torch.Tensor, ent: torch.Tensor):
    """A GRPOTrainer carrying just the attributes ``_compute_loss`` reads (set as ``GRPOTrainer.__init__`` does)."""
    t = GRPOTrainer.__new__(GRPOTrainer)
    t.args = args
    t.loss_type = args.loss_type
    t.importance_sampling_level = args.importance_sampling_level
    t.off_policy_mask_threshold = args.off_policy_mask_threshold
    t.top_entropy_quantile = args.top_entropy_quantile
    t.entropy_coef = args.entropy_coef
    t.use_adaptive_entropy = args.use_adaptive_entropy
    t._entropy_bonus_enabled = args.entropy_coef != 0.0 or args.use_adaptive_entropy
    t.epsilon_low = args.epsilon
    t.epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    t.beta = args.beta
    t.max_completion_length = args.max_completion_length
    t.use_vllm = False
    t.vllm_importance_sampling_correction = False
    t.aux_loss_enabled = False
    t.current_gradient_accumulation_steps = 1
    t.accelerator = _Accelerator()
    t.model = SimpleNamespace(training=True)
    t._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    t._get_per_token_logps_and_entropies = lambda *a, **k: (lp, ent, None)
    return t


def make_tensors(seed: int, *, scale: float, per_token: bool, full_rows: bool = True):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    lp = -(torch.rand(B, T, generator=g, dtype=torch.float64) * 2 + 0.05)
    old = lp + scale * torch.randn(B, T, generator=g, dtype=torch.float64)
    mu = old + scale * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64) if per_token else torch.randn(B, generator=g,
                                                                                              dtype=torch.float64)
    # entropies exact in float32: TRL takes their quantile in float32, pgzoo in the entropies' dtype
    ent = (torch.rand(B, T, generator=g) * 3).double()
    return dict(mask=mask, lp=lp, old=old, mu=mu, ref=ref, adv=adv, ent=ent)


def trl_grads(args: GRPOConfig, x: dict):
    lp = x["lp"].clone().requires_grad_(True)
    ent = x["ent"].clone().requires_grad_(True)
    trainer = stand_in(args, lp, ent)
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": x["mask"],
        "advantages": x["adv"], "old_per_token_logps": x["old"], "sampling_per_token_logps": x["mu"],
        "ref_per_token_logps": x["ref"], "num_items_in_batch": x["mask"].sum().double(),
    }
    loss = trainer._compute_loss(None, inputs)
    g_lp, g_ent = torch.autograd.grad(loss, (lp, ent), allow_unused=True)
    return loss.detach(), g_lp, g_ent


def pgzoo_grads(objective, x: dict, **batch_kw):
    lp = x["lp"].clone().requires_grad_(True)
    ent = x["ent"].clone().requires_grad_(True)
    batch = pgzoo.TokenBatch(logprobs=lp, mask=x["mask"], advantages=x["adv"], old_logprobs=x["old"],
                             rollout_logprobs=x["mu"], ref_logprobs=x["ref"], entropies=ent, max_tokens=MAX_LEN,
                             **batch_kw)
    out = objective(batch)
    g_lp, g_ent = torch.autograd.grad(out.loss, (lp, ent), allow_unused=True)
    return out, g_lp, g_ent


def assert_same(args: GRPOConfig, x: dict, **batch_kw):
    objective = objective_from_trl(args)
    trl_loss, trl_g, trl_ge = trl_grads(args, x)
    out, g, ge = pgzoo_grads(objective, x, **batch_kw)
    m = x["mask"].bool()
    assert trl_g.abs().max() > 0  # a vacuous comparison cannot pass
    torch.testing.assert_close(g[m], trl_g[m], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out.loss.detach(), trl_loss, rtol=1e-9, atol=1e-12)
    if args.entropy_coef != 0:
        torch.testing.assert_close(ge[m], trl_ge[m], rtol=1e-9, atol=1e-12)
    return out


LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"]
SHAPING = {
    "plain": {},
    "entropy-mask": dict(top_entropy_quantile=0.3),
    "off-policy-mask": dict(off_policy_mask_threshold=0.02),
    "beta": dict(beta=0.04),
    "beta-no-bias-correction": dict(beta=0.1, use_bias_correction_kl=False),
    "entropy-bonus": dict(entropy_coef=0.05, top_entropy_quantile=0.5),
    "all": dict(top_entropy_quantile=0.6, off_policy_mask_threshold=0.02, beta=0.04, entropy_coef=0.01),
}
# TRL builds SAPO's temperatures with torch.where on Python floats, i.e. in float32: 1.05 becomes 1.0499999523 there,
# a 1e-8 difference that float64 comparisons at 1e-9 would see. A temperature exact in float32 keeps them exact.
EXTRA = {"cispo": dict(epsilon_high=1.5), "dapo": dict(epsilon_high=0.28), "sapo": dict(sapo_temperature_neg=1.125),
         "luspo": dict(importance_sampling_level="sequence")}


@pytest.mark.parametrize("shaping", list(SHAPING))
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_trl_loss_type_with_every_shaping_option(loss_type, shaping):
    args = trl_config(loss_type=loss_type, **EXTRA.get(loss_type, {}), **SHAPING[shaping])
    for seed, per_token in ((0, False), (1, True)):
        assert_same(args, make_tensors(seed, scale=0.4, per_token=per_token))


def test_vespo_at_sequence_level():
    """VESPO's weights are per sequence whatever the level; TRL's level then only changes the bias-corrected KL's
    ratio, which pgzoo's vespo takes per token: equal without β, refused with it."""
    args = trl_config(loss_type="vespo", importance_sampling_level="sequence", top_entropy_quantile=0.5)
    assert_same(args, make_tensors(6, scale=0.3, per_token=False))
    with pytest.raises(ConfigError, match="importance_sampling_level='token'"):
        objective_from_trl(trl_config(loss_type="vespo", importance_sampling_level="sequence", beta=0.04))


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo"])
def test_sequence_importance_sampling_level(loss_type):
    for shaping in ("plain", "all"):
        args = trl_config(loss_type=loss_type, **{**EXTRA.get(loss_type, {}), "importance_sampling_level": "sequence"},
                          **SHAPING[shaping])
        assert_same(args, make_tensors(2, scale=0.15, per_token=False))


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "luspo"])
def test_two_sided_clip_delta(loss_type):
    args = trl_config(loss_type=loss_type, delta=1.5, beta=0.04, **EXTRA.get(loss_type, {}))
    out = assert_same(args, make_tensors(3, scale=1.5 if loss_type == "luspo" else 0.8, per_token=True))
    assert float(out.metrics["clip/delta_fraction"]) > 0  # tokens above δ with A < 0 exist


def test_luspo_at_trls_token_level_default():
    """TRL's luspo default (token level, with a warning) maps faithfully; pgzoo's own default is sequence level."""
    args = trl_config(loss_type="luspo")
    assert trl_options(args)[1]["importance_sampling_level"] == "token"
    assert_same(args, make_tensors(4, scale=0.4, per_token=False))
    assert pgzoo.get("luspo").config.importance_sampling_level == "sequence"


def test_extreme_ratios_and_cispo_cap():
    for loss_type in ("grpo", "cispo", "sapo", "vespo"):
        args = trl_config(loss_type=loss_type, **EXTRA.get(loss_type, {}))
        assert_same(args, make_tensors(5, scale=3.0, per_token=True))


def test_defaults_are_trls():
    """pgzoo.get(name) is TRL's out-of-the-box loss of that type (its GRPOConfig defaults)."""
    for loss_type in ("grpo", "bnpo", "sapo", "vespo"):
        args = trl_config(loss_type=loss_type)
        name, opts = trl_options(args)
        cfg = pgzoo.get(name).config
        assert {k: getattr(cfg, k) for k in opts} == opts, loss_type
    assert pgzoo.get("dapo").config.eps_high == trl_options(trl_config(loss_type="dapo", epsilon_high=0.28))[1][
        "eps_high"]
    luspo = trl_options(trl_config(loss_type="luspo", importance_sampling_level="sequence"))[1]
    assert {k: getattr(pgzoo.get("luspo").config, k) for k in luspo} == luspo


def test_unoffered_settings_raise_naming_the_option():
    with pytest.raises(ConfigError, match="use_adaptive_entropy"):
        objective_from_trl(trl_config(use_adaptive_entropy=True))
    with pytest.raises(ConfigError, match="epsilon_high"):
        objective_from_trl(trl_config(loss_type="cispo"))  # TRL's cap would be ε = 0.2
    with pytest.raises(ConfigError, match="delta"):
        apply_trl_settings(pgzoo.get("sapo"), trl_config(delta=4.0))
    with pytest.raises(ConfigError, match="top_entropy_quantile"):
        apply_trl_settings(pgzoo.get("grpo", top_entropy_quantile=0.5), trl_config(top_entropy_quantile=0.2))
    mapped = apply_trl_settings(pgzoo.get("grpo"), trl_config(top_entropy_quantile=0.2, beta=0.04))
    assert mapped.config.top_entropy_quantile == 0.2 and mapped.config.beta == 0.04
    assert mapped.config.bias_correction_kl is True and {"entropies", "ref_logprobs"} <= mapped.requires
    assert apply_trl_settings(pgzoo.get("minirl"), trl_config()).name == "minirl"  # nothing to map


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_fully_masked_row(loss_type):
    """TRL averages its per-sequence losses over every row of the micro-batch, a fully masked one included; pgzoo's
    N_seq counts rows with tokens unless told: num_sequences=B reproduces TRL exactly."""
    x = make_tensors(7, scale=0.4, per_token=True)
    x["mask"][-1] = 0
    x["lp"][-1], x["old"][-1] = 0.0, 0.0  # TRL multiplies masked values by 0, so its padding must be finite
    args = trl_config(loss_type=loss_type, **EXTRA.get(loss_type, {}), beta=0.04, top_entropy_quantile=0.7)
    assert_same(args, x, num_sequences=B)
