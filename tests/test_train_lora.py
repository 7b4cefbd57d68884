"""LoRA in the Lightning trainer (recipe ``model.lora``): only the adapters train, every sync hands the engine
W + (α/r)·B·A (parity at float32 precision after each update), the policy is unchanged by a sync, checkpoints hold
the adapter (PEFT's format) plus a merged folder plain transformers loads, and ``--resume`` is exact."""

from __future__ import annotations

import copy

import pytest
import torch

peft = pytest.importorskip("peft")

import pgzoo.adapters.lightning.run as train_mod  # noqa: E402
from pgzoo.errors import ConfigError, EngineError  # noqa: E402
from pgzoo.recipes import load_recipe  # noqa: E402

from pgzoo.models import fresh_tiny_checkpoint
from _train_helpers import RECIPE, digit_fraction_task, overrides, stable  # noqa: E402,F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LORA = ["model.lora.r=4", "model.lora.alpha=16", "model.lora.target_modules=[q_proj, v_proj, o_proj]",
        "model.lora.target_parameters=[mlp.experts.gate_up_proj, mlp.experts.down_proj]", "train.lr=5e-2"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return fresh_tiny_checkpoint(tmp_path_factory.mktemp("fresh") / "tiny")


def lora_recipe(ckpt, out, *extra):
    return load_recipe(RECIPE, overrides(ckpt, out, *LORA, *extra))


# ---------------------------------------------------------------------- the recipe section
def test_lora_section_is_strict_and_validated(ckpt, tmp_path):
    r = lora_recipe(ckpt, tmp_path / "r")
    assert r.model.lora.r == 4 and r.model.lora.alpha == 16 and r.model.lora.dropout == 0.0
    assert "LoRA r=4 alpha=16" in r.plan()
    assert load_recipe(RECIPE, overrides(ckpt, tmp_path / "r")).model.lora is None  # default: full fine-tuning
    assert load_recipe(RECIPE, ["model.lora={}"]).model.lora.target_modules == "all-linear"
    for bad, match in [("model.lora.r=0", "model.lora.r"), ("model.lora.r=true", "model.lora.r"),
                       ("model.lora.dropout=1.0", "model.lora.dropout"), ("model.lora.alpha='16'", "model.lora.alpha"),
                       ("model.lora.rank=4", "did you mean|model.lora.r"),
                       ("model.lora.target_modules=[q_proj, '']", "model.lora.target_modules"),
                       ("model.lora.target_modules=everything", "model.lora.target_modules")]:
        with pytest.raises(ConfigError, match=match):
            load_recipe(RECIPE, [bad])


def test_a_target_that_matches_nothing_names_the_key(ckpt, tmp_path):
    recipe = load_recipe(RECIPE, overrides(ckpt, tmp_path / "r", "model.lora.target_modules=[no_such_proj]"))
    with pytest.raises(ConfigError, match="model.lora"):
        train_mod.train(recipe, quiet=True)


# ---------------------------------------------------------------------- training, sync, checkpoints, resume
class SkipAdapterEngine:
    """The control: an engine whose sync leaves the adapter out (the base weights only)."""

    def __init__(self, inner):
        self.inner, self.supports_routes = inner, inner.supports_routes

    def generate(self, *a, **k):
        return self.inner.generate(*a, **k)

    def load_weights(self, model):
        from pgzoo.rollout.sync import sync_weights

        sync_weights(model, self.inner, adapters=False)

    def close(self):
        self.inner.close()


def test_lora_run_syncs_checkpoints_and_loads_with_plain_transformers(ckpt, tmp_path, monkeypatch):
    import transformers

    from pgzoo.adapters.lightning.module import RLModule
    seen = {}
    real_sync = RLModule.sync_engine

    def spying_sync(self, step, **kw):  # the trainable model is bit-identical before and after every sync
        before = {k: v.detach().clone() for k, v in self.policy.state_dict().items()}
        real_sync(self, step, **kw)
        after = self.policy.state_dict()
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
        seen["syncs"] = seen.get("syncs", 0) + 1
        opt = self.optimizers().optimizer
        seen["optimized"] = {id(p) for g in opt.param_groups for p in g["params"]}
        seen["named"] = {id(p): n for n, p in self.policy.named_parameters()}

    monkeypatch.setattr(RLModule, "sync_engine", spying_sync)
    out = tmp_path / "run"
    res = train_mod.train(lora_recipe(ckpt, out, "train.steps=3", "output.checkpoint_every=2",
                                      "rollout.verify_sync=1e-5"), quiet=True)
    assert seen["syncs"] == 3
    names = {seen["named"][i] for i in seen["optimized"]}
    assert names and all("lora_A" in n or "lora_B" in n for n in names)  # only the adapters are optimized
    for row in res.history:  # the engine samples from the LoRA policy: parity at float32 precision
        assert row["sync/logprob_abs_diff_mean"] < 1e-5, row

    final = res.checkpoint
    assert final.name == "step-000003" and (final / "MANIFEST.json").is_file()
    assert (final / "adapter" / "adapter_config.json").is_file()
    assert (final / "adapter" / "adapter_model.safetensors").is_file()
    # the merged folder is a plain Hugging Face model: W + (α/r)·B·A, and it computes what the PEFT policy does
    merged = transformers.AutoModelForCausalLM.from_pretrained(final).eval()
    base = transformers.AutoModelForCausalLM.from_pretrained(ckpt).eval()
    assert type(merged).__name__ == type(base).__name__
    moved = [k for k, v in merged.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert any("q_proj" in k for k in moved) and any("experts" in k for k in moved)
    assert not any("k_proj" in k or "embed" in k for k in moved)  # untargeted weights stay the base's
    adapted = peft.PeftModel.from_pretrained(copy.deepcopy(base), final / "adapter").eval()
    ids = torch.tensor([[5, 9, 12, 7, 3, 20]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-5, rtol=1e-5)

    # the control: a sync that skips the adapter fails the same check
    real_build = train_mod.build_engine
    monkeypatch.setattr(RLModule, "sync_engine", real_sync)

    monkeypatch.setattr(train_mod, "build_engine", lambda r, p: SkipAdapterEngine(real_build(r, p)))
    with pytest.raises(EngineError, match="weight sync check failed"):
        train_mod.train(lora_recipe(ckpt, tmp_path / "control", "train.steps=2", "rollout.verify_sync=1e-5"),
                        quiet=True)


@pytest.mark.slow
def test_lora_resume_continues_exactly(ckpt, tmp_path):
    steps = ["train.steps=4", "output.checkpoint_every=2", "model.lora.target_modules=all-linear"]
    full = train_mod.train(lora_recipe(ckpt, tmp_path / "full", *steps), quiet=True)
    # the interrupted run: the same folder without its last checkpoint
    import shutil

    from pgzoo.adapters.lightning import run_folder as rf

    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    last = rf.latest_checkpoint(tmp_path / "cut")
    shutil.rmtree(last)
    assert rf.latest_checkpoint(tmp_path / "cut") is not None
    resumed = train_mod.train(lora_recipe(ckpt, tmp_path / "cut", *steps), resume=True, quiet=True)
    assert [r["step"] for r in resumed.history] == [0, 1, 2, 3]
    for a, b in zip(full.history, resumed.history):
        a, b = stable(a), stable(b)
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (a["step"], k)
    from safetensors.torch import load_file

    wa = load_file(full.checkpoint / "adapter" / "adapter_model.safetensors")
    wb = load_file(resumed.checkpoint / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5)
    assert rf.checkpoint_step(resumed.checkpoint) == 3


def test_resume_refuses_a_different_base_or_a_missing_adapter(ckpt, tmp_path):
    out = tmp_path / "run"
    train_mod.train(lora_recipe(ckpt, out, "train.steps=1"), quiet=True)
    with pytest.raises(ConfigError, match="model.lora"):  # a LoRA checkpoint resumed as full fine-tuning
        train_mod.train(load_recipe(RECIPE, overrides(ckpt, out, "train.steps=2")), resume=True, quiet=True)
    other = fresh_tiny_checkpoint(tmp_path / "other")
    with pytest.raises(ConfigError, match=r"recipe differs .*model.path: '.*' -> '.*other'"):
        train_mod.train(load_recipe(RECIPE, overrides(other, out, *LORA, "train.steps=2")), resume=True, quiet=True)
    with pytest.raises(ConfigError, match=r"model.lora.r: \d+ -> 8"):
        train_mod.train(lora_recipe(ckpt, out, "train.steps=2", "model.lora.r=8"), resume=True, quiet=True)


@pytest.mark.slow
@pytest.mark.vllm
def test_lora_run_with_vllm_rollouts_keeps_parity(ckpt, tmp_path):
    """The main job's engine: vLLM CPU receives W + (α/r)·B·A after every LoRA update (parity at 1e-5)."""
    pytest.importorskip("vllm")
    res = train_mod.train(lora_recipe(ckpt, tmp_path / "v", "rollout.engine=vllm", "train.steps=2",
                                      "output.checkpoint_every=0", "rollout.verify_sync=1e-5"), quiet=True)
    assert [r["step"] for r in res.history] == [0, 1]
    for row in res.history:
        assert row["sync/logprob_abs_diff_mean"] < 1e-5, row
        assert abs(row["kl/train_inference_k1"]) < 1e-4
    assert (res.checkpoint / "adapter" / "adapter_model.safetensors").is_file()
