"""A pytest plugin (``-p _example_objective``) that registers a throwaway objective before collection.

``example-reinforce`` is a correct REINFORCE objective written the way a user adds one (a class and a ``register``
call, nothing else): the whole property suite must pick it up and pass. tests/test_objective_properties_plugin.py
runs tests/test_objective_properties.py in a child pytest with this plugin; the registration happens in
``pytest_configure`` (before collection) rather than at import, so importing the class elsewhere registers nothing
and the main test session's registry, which tests/test_trl.py, test_cli.py and others read, never sees it.
"""

from __future__ import annotations

from dataclasses import dataclass

import pgzoo


class ExampleReinforce(pgzoo.Objective):
    """−Σ m·A·lp / N_tok: REINFORCE with the token-mean normaliser; one metric of its own."""

    @dataclass(frozen=True)
    class Config:
        pass

    default_advantage = "group-mean"

    def compute(self, batch: pgzoo.TokenBatch) -> pgzoo.ObjectiveOutput:
        term = batch.token_advantages() * batch.masked(batch.logprobs)  # both zero at masked positions
        loss = -pgzoo.aggregate(term, batch, "token-mean", clean=True)
        if not self.report_metrics:
            return pgzoo.ObjectiveOutput(loss, {})
        staleness = batch.masked(batch.logprobs.detach().float()) - batch.clean("old_logprobs").float()
        mean = staleness.sum() / batch.local_token_count().float().clamp_min(1.0)
        return pgzoo.ObjectiveOutput(loss, {"log_ratio/staleness_mean": mean})


def pytest_configure(config):
    pgzoo.register("example-reinforce", ExampleReinforce)
