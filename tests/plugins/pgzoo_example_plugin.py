"""A third-party objective package, as a user would write it, found through the `pgzoo.objectives` entry points.

entry_points.txt of its distribution:

    [pgzoo.objectives]
    example-reinforce = pgzoo_example_plugin:ExampleReinforce
    example-variants = pgzoo_example_plugin:register_variants
"""

from dataclasses import dataclass

import pgzoo


class ExampleReinforce(pgzoo.Objective):
    """Plain REINFORCE with a scale: −scale · Σ m·A·lp / N_tok."""

    @dataclass(frozen=True)
    class Config:
        scale: float = 1.0

    default_advantage = "leave-one-out"

    def compute(self, batch):
        term = batch.token_advantages() * batch.masked(batch.logprobs)
        return pgzoo.ObjectiveOutput(-self.config.scale * pgzoo.aggregate(term, batch, "token-mean"), {})


def register_variants():
    """An entry point may also be a callable that registers several objectives."""
    pgzoo.register("example-reinforce-half", ExampleReinforce, scale=0.5)
