"""`pgzoo train` with a loss-shaping option and a new objective: the entropies reach the objective."""

from __future__ import annotations

import pytest

import pgzoo.adapters.lightning.run as train_mod
from pgzoo.errors import BatchError
from pgzoo.recipes import load_recipe

from pgzoo.models import fresh_tiny_checkpoint
from _train_helpers import RECIPE, digit_fraction_task, overrides  # noqa: F401


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return fresh_tiny_checkpoint(tmp_path_factory.mktemp("fresh") / "tiny")


def test_entropy_mask_in_the_lightning_trainer(ckpt, tmp_path):
    recipe = load_recipe(RECIPE, overrides(ckpt, tmp_path / "s", "train.steps=1", "objective.name=sapo",
                                           "objective.options.top_entropy_quantile=0.5"))
    row = train_mod.train(recipe, quiet=True).history[-1]
    assert 0.3 < row["shaping/entropy_kept_fraction"] <= 0.7


def test_entropy_bonus_needs_entropies_with_gradient(ckpt, tmp_path):
    recipe = load_recipe(RECIPE, overrides(ckpt, tmp_path / "b", "train.steps=1", "objective.name=grpo",
                                           "objective.options.entropy_coef=0.01"))
    with pytest.raises(BatchError, match="entropy_coef"):
        train_mod.train(recipe, quiet=True)
