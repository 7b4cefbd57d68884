"""Resuming with a changed recipe is refused, naming the keys, unless each is safe and explicitly allowed."""

import pytest

from pgzoo.errors import ConfigError
from pgzoo.recipes.diff import SAFE_TO_CHANGE, changed_keys, check_resume, flatten
from pgzoo.recipes import load_recipe


def _dump(*overrides):
    return load_recipe("recipes/tiny/minirl.yaml", list(overrides)).model_dump(mode="json")


def test_same_recipe_resumes():
    assert check_resume(_dump(), _dump()) == []


def test_changed_keys_are_named():
    assert changed_keys(_dump(), _dump("train.lr=3e-4", "objective.options={eps_high: 0.3}")) == [
        "objective.options", "train.lr"]


def test_unsafe_change_is_refused_with_the_values():
    with pytest.raises(ConfigError, match=r"train.lr: 0.0003 -> 0.001.*resume with the recipe of the run"):
        check_resume(_dump("train.lr=3e-4"), _dump("train.lr=1e-3"))


def test_safe_change_needs_the_flag():
    with pytest.raises(ConfigError, match=r"train.steps: 40 -> 80.*pass --allow-change train.steps"):
        check_resume(_dump("train.steps=40"), _dump("train.steps=80"))
    assert check_resume(_dump("train.steps=40"), _dump("train.steps=80"), ["train.steps"]) == ["train.steps"]


def test_allowing_an_unsafe_key_is_refused():
    with pytest.raises(ConfigError, match="--allow-change train.lr: not a key a resumed run may change"):
        check_resume(_dump("train.lr=3e-4"), _dump("train.lr=1e-3"), ["train.lr"])


def test_every_safe_key_exists_in_the_schema():
    # optional sections (null by default) are switched on so that their keys are listed too
    keys = set(flatten(_dump())) | set(flatten(_dump("rollout.dynamic_sampling.max_draws=10")))
    assert SAFE_TO_CHANGE <= keys, SAFE_TO_CHANGE - keys


def test_a_key_added_after_a_run_was_recorded_counts_as_its_default():
    """A run recorded before a recipe key existed ran with what its default keeps: resuming it (or a grid checking
    it) must not call the missing key a change; a recorded non-default value still is one."""
    from pgzoo.recipes import load_recipe
    from pgzoo.recipes.diff import changed_keys

    now = load_recipe("tiny/minirl").model_dump(mode="json")
    old = {k: dict(v) if isinstance(v, dict) else v for k, v in now.items()}
    del old["train"]["dist_timeout"]  # as written by a version without the key
    del old["rollout"]["dynamic_sampling"]
    assert changed_keys(old, now) == []
    old["train"]["lr"] = 0.1
    assert changed_keys(old, now) == ["train.lr"]
