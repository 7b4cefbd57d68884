"""pgzoo inside verl: every pgzoo objective as a verl policy loss, pgzoo's extra advantage estimators as verl
estimators (docs/verl.md).

Installed with pgzoo as the ``verl.plugins`` entry point ``pgzoo`` (module :mod:`pgzoo.adapters.verl.plugin`), so
``import verl`` registers ``pgzoo/<name>`` for every name of :func:`pgzoo.available` and ``pgzoo/<estimator>`` for the
estimators verl lacks; a verl run then needs one override,
``actor_rollout_ref.actor.policy_loss.loss_mode=pgzoo/minirl``.

Modules: :mod:`~pgzoo.adapters.verl.names` (verl's names and pgzoo's, no verl import: the recipe export uses it),
:mod:`~pgzoo.adapters.verl.policy_loss` (the loss and its settings), :mod:`~pgzoo.adapters.verl.estimators` and
:mod:`~pgzoo.adapters.verl.plugin` (the registration). Only ``names`` imports without verl.
"""
