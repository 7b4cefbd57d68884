"""Advantage estimators: outcome rewards of G completions per prompt → one advantage per completion, or per token.

    >>> pgzoo.advantages.compute("group-mean-std", torch.tensor([1., 0., 0., 0.]), group_size=2)
    tensor([ 0.7071, -0.7071,  0.0000,  0.0000])

Groups are given either as ``group_size`` (rows of one prompt contiguous, prompt-major) or as ``group_ids``
(any integer labels, e.g. ``Rollouts.group``); the batch-level ``reinforce++`` needs neither. Estimators are entries
of the generic registry :data:`pgzoo.advantages.registry` (entry-point group ``pgzoo.advantages``); custom ones
register with :func:`register`, and declare what they need with attributes (:mod:`pgzoo.advantages.base`).

Modules: :mod:`~pgzoo.advantages.base` (the registry, the declarations), :mod:`~pgzoo.advantages.stats` (group and
batch statistics), :mod:`~pgzoo.advantages.token_returns` (per-token returns of an outcome reward),
:mod:`~pgzoo.advantages.outcome` (the estimators of one advantage per completion; ``reinforce++`` with ``gamma < 1``
gives one per token), :mod:`~pgzoo.advantages.optimal_token_baseline` (OTB, per token) and
:mod:`~pgzoo.advantages.api` (:func:`compute`).
"""

from pgzoo.advantages.base import Estimator, available, registry, register, token_inputs, trainer_estimators, unregister
from pgzoo.advantages import optimal_token_baseline, outcome  # noqa: F401  importing them registers their estimators
from pgzoo.advantages.api import compute

__all__ = ["available", "compute", "register", "unregister", "token_inputs", "trainer_estimators", "registry",
           "Estimator"]
