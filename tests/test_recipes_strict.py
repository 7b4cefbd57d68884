"""Recipes are strict: booleans are booleans, numbers are numbers, ranges are checked when the recipe is read, and
an empty file, a YAML list or a key given twice is an error."""

import pytest

from pgzoo.errors import ConfigError
from pgzoo.recipes.strict_yaml import load_yaml
from pgzoo.recipes import load_recipe, recipe_from_dict

TINY = "recipes/tiny/minirl.yaml"


@pytest.mark.parametrize("override, match", [
    ('eval.before="false"', r"eval.before: Input should be a valid boolean .*got 'false'"),
    ("eval.before=1", r"eval.before: Input should be a valid boolean"),
    ("rollout.fp8=yes_please", r"rollout.fp8: Input should be a valid boolean"),
    ("train.steps=3.0", r"train.steps: Input should be a valid integer"),
    ("train.steps=true", r"train.steps: Input should be a valid integer"),
    ('train.lr="3e-4"', r"train.lr: Input should be a valid number"),
    ("train.lr=.inf", r"train.lr: Input should be a finite number"),
    ("train.lr=.nan", r"train.lr: Input should be a finite number"),
    ("train.lr=0", r"train.lr: Input should be greater than 0"),
    ("train.lr=-1e-4", r"train.lr: Input should be greater than 0"),
    ("train.betas=[0.9, 1.0]", r"train.betas: Value error, each Adam beta must be in \[0, 1\)"),
    ("train.betas=[-0.1, 0.99]", r"train.betas: Value error, each Adam beta must be in \[0, 1\)"),
    ("train.betas=[0.9]", r"train.betas"),
    ("train.grad_clip=.inf", r"train.grad_clip: Input should be a finite number"),
    ("seed=1.5", r"seed: Input should be a valid integer"),
    ("name=7", r"name: Input should be a valid string"),
    ("output.keep_checkpoints=0", r"output.keep_checkpoints: Input should be greater than 0"),
])
def test_strict_values(override, match):
    with pytest.raises(ConfigError, match=match):
        load_recipe(TINY, [override])


def test_numbers_in_exponent_form_are_numbers():
    r = load_recipe(TINY, ["train.lr=3e-4", "train.weight_decay=1E-2", "train.betas=[0.9, 0.95]"])
    assert r.train.lr == 3e-4 and isinstance(r.train.lr, float)
    assert r.train.weight_decay == 0.01
    assert r.train.betas == (0.9, 0.95)
    assert r.train.steps == load_recipe(TINY).train.steps  # an int stays an int
    again = recipe_from_dict(load_yaml(r.dump()))  # the dump reads back under the strict schema
    assert again == r


def test_yaml_floats_and_strings():
    assert load_yaml("a: 3e-4\nb: 1e5\nc: .5\nd: -2.5E+3\ne: '3e-4'\nf: 1_000\ng: 12\nh: v1e5") == {
        "a": 3e-4, "b": 1e5, "c": 0.5, "d": -2500.0, "e": "3e-4", "f": 1000, "g": 12, "h": "v1e5"}


def test_empty_file_list_and_duplicate_keys(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n")
    with pytest.raises(ConfigError, match="the recipe file is empty; start from a shipped one"):
        load_recipe(empty)
    lst = tmp_path / "list.yaml"
    lst.write_text("- train\n- rollout\n")
    with pytest.raises(ConfigError, match="a recipe must be a YAML mapping of sections, got list"):
        load_recipe(lst)
    dup = tmp_path / "dup.yaml"
    dup.write_text("train:\n  lr: 1e-4\n  steps: 3\n  lr: 1e-3\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: key 'lr' is given twice \(lines 2 and 4\); keep one"):
        load_recipe(dup)
    top = tmp_path / "top.yaml"
    top.write_text("train: {steps: 3}\ntrain: {steps: 4}\n")
    with pytest.raises(ConfigError, match="key 'train' is given twice"):
        load_recipe(top)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(bad)


def test_model_path_must_be_a_model_folder(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_text("x")
    with pytest.raises(ConfigError, match="model.path=.* is a file, not a folder"):
        load_recipe(TINY, [f"model.path={f}"]).check_files()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="model.path=.* has no config.json .the folder is empty."):
        load_recipe(TINY, [f"model.path={tmp_path / 'empty'}"]).check_files()
