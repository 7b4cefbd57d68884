"""Recipes: a typed schema that maps one-to-one onto the YAML files in ``recipes/`` (torchtune-style).

    from pgzoo.recipes import load_recipe
    recipe = load_recipe("tiny/minirl", ["train.lr=3e-4"])     # a file, or a shipped recipe's name
    recipe.train.lr, recipe.rollout.engine, recipe.plan(), recipe.dump()

==================  =========================================================================================
module              what it holds
==================  =========================================================================================
``schema``          :class:`~pgzoo.recipes.schema.Recipe`: the whole run, its combination checks and plan
``sections``        one typed class per YAML key (``model``, ``task``, ``objective``, ``rollout``, ...)
``load``            :func:`~pgzoo.recipes.load.load_recipe`: a file or name plus overrides -> a checked Recipe
``strict_yaml``     YAML 1.2 floats, no duplicate keys
``catalog``         the recipes shipped with pgzoo: find, list, copy
``diff``            what a resumed run may change
==================  =========================================================================================
"""

from pgzoo.recipes.load import load_recipe, recipe_from_dict
from pgzoo.recipes.schema import Recipe

__all__ = ["Recipe", "load_recipe", "recipe_from_dict"]
