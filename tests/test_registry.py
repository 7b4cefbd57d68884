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
from pgzoo.advantages import registry as ADVANTAGES
from pgzoo.objectives import registry as objective_registry
from pgzoo.objectives.registry import objectives as OBJECTIVES
from pgzoo.registry import Registry
from pgzoo.rollout.builders import engines as ENGINES
from pgzoo.tasks.base import registry as TASKS
from pgzoo.testing import random_batch

TEN = ["cispo", "dapo", "dr-grpo", "grpo", "gspo", "gspo-token",
       "minirl", "minirl-length-norm", "minirl-no-clip", "minirl-no-is"]


def test_the_ten_objectives_are_registered():
    assert set(TEN) <= set(pgzoo.available())
    assert pgzoo.available("minirl*") == ["minirl", "minirl-length-norm", "minirl-no-clip", "minirl-no-is"]
    assert pgzoo.available("gspo_*") == ["gspo-token"]


@pytest.mark.parametrize("name", pgzoo.available())
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
    dapo = {k: v for k, v in objective_registry.defaults("dapo").items() if k != "paper"}
    assert dapo == {"eps_high": 0.28, "aggregation": "token-mean"}
    assert objective_registry.get_class("minirl-no-clip") is objective_registry.get_class("minirl")


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
    monkeypatch.setattr(OBJECTIVES, "_plugins_loaded", False)
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
    monkeypatch.setattr(OBJECTIVES, "_plugins_loaded", False)
    with pytest.raises(pgzoo.ConfigError, match="'broken'"):
        pgzoo.get("not-registered-anywhere")


# -- the generic Registry and its four instances ------------------------------------------------------------------
def test_four_registries_are_instances_of_one_class():
    regs = [OBJECTIVES, ADVANTAGES, TASKS, ENGINES]
    assert all(type(r) is Registry for r in regs)
    assert [r.group for r in regs] == ["pgzoo.objectives", "pgzoo.advantages", "pgzoo.tasks", "pgzoo.engines"]
    assert {"transformers", "vllm"} <= set(ENGINES.available())  # the built-ins; plugins and tests may add more
    assert TASKS.available("ar*") == ["arithmetic"]
    assert "rloo" in ADVANTAGES.available("r*")
    assert pgzoo.advantages.available() == ADVANTAGES.available()
    assert pgzoo.tasks.available() == TASKS.available()


def test_generic_registry_rules():
    reg = Registry("widget", "pgzoo.test-widgets")

    @reg.register("Big_Widget", size=3)
    def big(size=1):
        return ("big", size)

    @reg.register
    def small_widget(size=1):
        return ("small", size)

    reg.register("tiny", lambda size=0: ("tiny", size))
    assert reg.available() == ["big-widget", "small-widget", "tiny"]
    assert reg.available("*widget") == ["big-widget", "small-widget"]
    assert reg.build(" big_widget ") == ("big", 3) and reg.build("big-widget", size=5) == ("big", 5)
    assert reg.get("small-widget") is small_widget and "tiny" in reg and "huge" not in reg
    with pytest.raises(pgzoo.UnknownNameError, match="unknown widget 'smal-widget'. Did you mean 'small-widget'"):
        reg.get("smal-widget")
    with pytest.raises(pgzoo.ConfigError, match="already registered"):
        reg.register("tiny", big)
    reg.register("tiny", big, override=True)
    assert reg.get("tiny") is big
    with pytest.raises(pgzoo.ConfigError, match="expected a callable"):
        reg.register("not-callable", 3)
    with pytest.raises(pgzoo.ConfigError, match="non-empty string"):
        reg.get("")
    reg.unregister("tiny")
    reg.unregister("tiny")  # absent: no error
    assert reg.available() == ["big-widget", "small-widget"]


def test_class_registries_refuse_other_things():
    with pytest.raises(pgzoo.ConfigError, match="pgzoo.Objective subclass"):
        pgzoo.register("not-an-objective", dict)
    with pytest.raises(pgzoo.ConfigError, match="Task subclass"):
        pgzoo.tasks.register("not-a-task")(dict)


def _dist(tmp_path, name, groups: dict[str, list[str]], source: str | None = None):
    """A fake installed distribution with entry points (and optionally a module), found on sys.path."""
    if source is not None:
        (tmp_path / f"{name}.py").write_text(source)
    dist = tmp_path / f"{name}-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "".join(f"[{group}]\n" + "".join(line + "\n" for line in lines) for group, lines in groups.items()))


PLUGIN_SOURCE = '''
import torch
import pgzoo
from pgzoo.rollout.builders import engines
from pgzoo.tasks import Problem, Task


class EchoTask(Task):
    name = "echo"

    def __init__(self, word: str = "hi"):
        super().__init__()
        self.options = {"word": word}

    def sample(self, n, split="train", seed=0):
        return [Problem(self.options["word"], self.options["word"])] * n

    def verify(self, completion, answer):
        return completion.strip() == answer


def doubled(rewards, index, num_groups, *, factor: float = 2.0):
    return factor * rewards


def register_more():
    pgzoo.advantages.register("plugin-tripled")(lambda rewards, index, num_groups: 3 * rewards)


class FakeEngine:
    def __init__(self, path, temperature, seed):
        self.path, self.temperature, self.seed = path, temperature, seed


@engines.register("plugin-module-engine")
def build_from_module(rollout, model_path, *, seed, return_routes, world_size=1):
    return FakeEngine(model_path, rollout.temperature, seed)


def build_fake(rollout, model_path, *, seed, return_routes, world_size=1):
    return FakeEngine(model_path, rollout.temperature, seed)
'''


def test_entry_point_plugins_for_tasks_advantages_and_engines(tmp_path, monkeypatch):
    _dist(tmp_path, "pgzoo_multi_plugin", {
        "pgzoo.tasks": ["echo-plugin = pgzoo_multi_plugin:EchoTask"],
        "pgzoo.advantages": ["plugin-doubled = pgzoo_multi_plugin:doubled",
                             "plugin-more = pgzoo_multi_plugin:register_more"],
        "pgzoo.engines": ["plugin-engine = pgzoo_multi_plugin:build_fake",
                          "plugin-module = pgzoo_multi_plugin"],
    }, PLUGIN_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    regs = (TASKS, ADVANTAGES, ENGINES)
    for reg in regs:
        monkeypatch.setattr(reg, "_plugins_loaded", False)
    try:
        task = pgzoo.tasks.get("echo_plugin", word="yo")
        assert task.sample(2) == [pgzoo.tasks.Problem("yo", "yo")] * 2
        r = torch.tensor([1.0, 0.0])
        assert pgzoo.advantages.compute("plugin-doubled", r, group_size=2, factor=5.0).tolist() == [5.0, 0.0]
        assert pgzoo.advantages.compute("plugin-tripled", r, group_size=2).tolist() == [3.0, 0.0]
        assert "plugin-more" not in pgzoo.advantages.available()  # a registrar is called, not registered

        from pgzoo.recipes import Recipe
        from pgzoo.adapters.lightning.run import build_engine

        for name in ("plugin-engine", "plugin-module-engine"):
            recipe = Recipe.model_validate({"seed": 7, "rollout": {"engine": name, "temperature": 0.5}})
            engine = build_engine(recipe, tmp_path)
            assert type(engine).__name__ == "FakeEngine"
            assert (engine.path, engine.temperature, engine.seed) == (tmp_path, 0.5, 7)
    finally:
        for name in ("echo-plugin",):
            TASKS.unregister(name)
        for name in ("plugin-doubled", "plugin-tripled"):
            ADVANTAGES.unregister(name)
        for name in ("plugin-engine", "plugin-module-engine"):
            ENGINES.unregister(name)
        sys.modules.pop("pgzoo_multi_plugin", None)


def test_recipe_rollout_engine_is_checked_against_the_engine_registry():
    from pgzoo.recipes import load_recipe

    root = Path(__file__).resolve().parents[1] / "recipes" / "tiny" / "minirl.yaml"
    with pytest.raises(pgzoo.ConfigError, match=r"rollout.engine.*unknown rollout engine 'vlm'. Did you mean 'vllm'"):
        load_recipe(root, ["rollout.engine=vlm"])
    assert load_recipe(root, ["rollout.engine=Transformers"]).rollout.engine == "transformers"

    @ENGINES.register("test-engine")
    def build(rollout, model_path, *, seed, return_routes, world_size=1):
        return (rollout.engine, model_path, seed, return_routes)

    try:
        recipe = load_recipe(root, ["rollout.engine=test_engine", "seed=3"])
        from pgzoo.adapters.lightning.run import build_engine

        assert build_engine(recipe, Path("m")) == ("test-engine", Path("m"), 3, False)
    finally:
        ENGINES.unregister("test-engine")


def test_default_advantage_is_looked_up_in_the_estimator_registry():
    assert pgzoo.get("grpo", default_advantage="RLOO").default_advantage == "rloo"
    assert pgzoo.get("dapo", default_advantage="reinforce++_baseline").default_advantage == "reinforce++-baseline"
    with pytest.raises(pgzoo.UnknownNameError, match="Did you mean 'rloo'"):
        pgzoo.get("grpo", default_advantage="rlo")
