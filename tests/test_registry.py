"""The registry: names, wildcards, overrides, duplicates, suggestions and entry-point plugins."""

from __future__ import annotations

import importlib
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import pgzoo
from pgzoo import registry
from pgzoo.testing import random_batch

TEN = ["cispo", "dapo", "dr-grpo", "grpo", "gspo", "gspo-token",
       "minirl", "minirl-length-norm", "minirl-no-clip", "minirl-no-is"]


def test_the_ten_objectives_are_registered():
    assert set(TEN) <= set(pgzoo.available())
    assert pgzoo.available("minirl*") == ["minirl", "minirl-length-norm", "minirl-no-clip", "minirl-no-is"]
    assert pgzoo.available("gspo_*") == ["gspo-token"]


@pytest.mark.parametrize("name", TEN)
def test_every_registered_objective_runs(name):
    """Parametrised over the registry (timm-style): shape, masking, finiteness and a nonzero gradient."""
    obj = pgzoo.get(name)
    assert isinstance(obj, pgzoo.Objective) and obj.name == name
    assert obj.requires <= {"old_logprobs", "rollout_logprobs", "ref_logprobs"}
    assert obj.default_advantage in pgzoo.advantages.available()
    batch = random_batch(4, 6, seed=0, scale=1e-4, pad_value=float("nan"))
    out = obj(batch)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    g = pgzoo.testing.grad_wrt_logprobs(obj, batch)
    assert (g[~batch.mask] == 0).all() and g[batch.mask].abs().sum() > 0
    assert repr(obj).startswith(type(obj).__name__)


def test_names_accept_underscores_and_case():
    assert pgzoo.get("DR_GRPO").name == "dr-grpo"
    assert pgzoo.get(" minirl_no_is ").config.train_inference_is is False


def test_unknown_name_suggests_nearest():
    with pytest.raises(pgzoo.UnknownNameError) as info:
        pgzoo.get("minirl-no-clp")
    assert "Did you mean 'minirl-no-clip'" in str(info.value)
    assert isinstance(info.value, LookupError)
    with pytest.raises(pgzoo.ConfigError):
        pgzoo.get("")


def test_unknown_override_lists_valid_keys():
    with pytest.raises(pgzoo.ConfigError) as info:
        pgzoo.get("grpo", eps=0.1)
    msg = str(info.value)
    assert "'eps'" in msg and "eps_low" in msg and "eps_high" in msg and "beta" in msg


def test_overrides_keep_other_defaults():
    obj = pgzoo.get("dapo", eps_low=0.1)
    assert (obj.config.eps_low, obj.config.eps_high, obj.config.aggregation) == (0.1, 0.28, "token-mean")
    dapo = {k: v for k, v in registry.defaults("dapo").items() if k != "paper"}
    assert dapo == {"eps_high": 0.28, "aggregation": "token-mean"}
    assert registry.get_class("minirl-no-clip") is registry.get_class("minirl")


def test_register_decorator_duplicate_and_override():
    @pgzoo.register("test-dup")
    class A(pgzoo.Objective):
        @dataclass(frozen=True)
        class Config:
            k: int = 1

    try:
        with pytest.raises(pgzoo.ConfigError, match="already registered"):
            pgzoo.register("test-dup", A)
        with pytest.raises(pgzoo.ConfigError, match="valid keys"):
            pgzoo.register("test-dup-2", A, q=3)
        pgzoo.register("test-dup", A, override=True, k=2)
        assert pgzoo.get("test-dup").config.k == 2
        with pytest.raises(pgzoo.ConfigError, match="already registered"):
            pgzoo.register("minirl", A)  # built-ins are protected the same way
    finally:
        pgzoo.unregister("test-dup")
        pgzoo.unregister("test-dup-2")
    assert "test-dup" not in pgzoo.available()


def test_entry_point_plugin_is_found(tmp_path, monkeypatch):
    src = Path(__file__).parent / "plugins" / "pgzoo_example_plugin.py"
    shutil.copy(src, tmp_path / "pgzoo_example_plugin.py")
    dist = tmp_path / "pgzoo_example_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: pgzoo-example-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[pgzoo.objectives]\n"
        "example-reinforce = pgzoo_example_plugin:ExampleReinforce\n"
        "example-variants = pgzoo_example_plugin:register_variants\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    monkeypatch.setattr(registry.objectives, "_plugins_loaded", False)
    try:
        obj = pgzoo.get("example_reinforce", scale=2.0)
        assert type(obj).__name__ == "ExampleReinforce" and obj.config.scale == 2.0
        assert obj.default_advantage == "leave-one-out"
        assert pgzoo.get("example-reinforce-half").config.scale == 0.5
        assert {"example-reinforce", "example-reinforce-half"} <= set(pgzoo.available("example*"))
        batch = random_batch(3, 5, seed=0, off_policy=False)
        g = pgzoo.testing.grad_wrt_logprobs(obj, batch)
        m = batch.mask
        torch.testing.assert_close(g, torch.where(m, -2.0 * batch.advantages[:, None] / m.sum(), 0 * g))
    finally:
        pgzoo.unregister("example-reinforce")
        pgzoo.unregister("example-reinforce-half")
        sys.modules.pop("pgzoo_example_plugin", None)


def test_broken_plugin_names_the_entry_point(tmp_path, monkeypatch):
    dist = tmp_path / "broken_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[pgzoo.objectives]\nbroken = no_such_module_xyz:Thing\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    monkeypatch.setattr(registry.objectives, "_plugins_loaded", False)
    with pytest.raises(pgzoo.ConfigError, match="'broken'"):
        pgzoo.get("not-registered-anywhere")
