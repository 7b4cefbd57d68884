"""A pytest plugin (``-p _broken_objectives``) that registers objectives with one mistake each, before collection.

Each is ``example-reinforce`` (tests/_example_objective.py) with one mistake a user could make; the property suite
must fail on it, in the test(s) named in ``BROKEN``: the properties can fail. Registered in ``pytest_configure`` of a
child pytest run by tests/test_objective_properties_plugin.py, so importing ``BROKEN`` registers nothing here.
"""

from __future__ import annotations

import torch
from _example_objective import ExampleReinforce

import pgzoo


class ReadsMaskedPositions(ExampleReinforce):
    """Multiplies by the mask instead of replacing masked values: NaN · 0 = NaN."""

    def compute(self, batch):
        m = batch.mask.to(batch.logprobs.dtype)
        adv = batch.advantages if batch.advantages.dim() == 2 else batch.advantages[:, None]
        return pgzoo.ObjectiveOutput(-(adv * batch.logprobs * m).sum() / batch.token_count(), {})


class LocalNormaliser(ExampleReinforce):
    """Divides by its own token count, ignoring ``num_tokens``: micro-batches no longer add up."""

    def compute(self, batch):
        term = batch.token_advantages() * batch.masked(batch.logprobs)
        return pgzoo.ObjectiveOutput(-term.sum() / batch.local_token_count().clamp_min(1.0), {})


class CountsEmptyRows(ExampleReinforce):
    """Normalises per row by all B rows, token-less ones included."""

    def compute(self, batch):
        term = batch.token_advantages() * batch.masked(batch.logprobs)
        rows = batch.num_sequences if batch.num_sequences is not None else batch.batch_size
        return pgzoo.ObjectiveOutput(-term.sum() / rows, {})


class MetricsOffDiffers(ExampleReinforce):
    """Computes the loss another way when metrics are off (here: in another order), so it is not bit-identical."""

    def compute(self, batch):
        out = super().compute(batch)
        if self.report_metrics:
            return out
        term = batch.token_advantages() * batch.masked(batch.logprobs)
        return pgzoo.ObjectiveOutput(-(term.sum(-1).sum() / batch.token_count()), {})


class UndocumentedMetric(ExampleReinforce):
    """Reports a metric docs/metrics.md does not describe."""

    def compute(self, batch):
        out = super().compute(batch)
        if self.report_metrics:
            out.metrics["example/undocumented"] = out.loss.detach()
        return out


class HostSync(ExampleReinforce):
    """Reads a value on the host inside the loss (a graph break, and a stall on a GPU)."""

    def compute(self, batch):
        out = super().compute(batch)
        if float(batch.advantages.abs().max()) == 0.0:
            return pgzoo.ObjectiveOutput(out.loss * 0.0, out.metrics)
        return out


class UnclampedRatio(ExampleReinforce):
    """PPO's ratio exp(lp − old) without a clamp: overflows once the policies drift far apart."""

    def compute(self, batch):
        r = torch.exp(batch.masked(batch.logprobs) - batch.clean("old_logprobs"))
        loss = -pgzoo.aggregate(batch.token_advantages() * r, batch, "token-mean")
        return pgzoo.ObjectiveOutput(loss, {})


class RowOrder(ExampleReinforce):
    """Weights rows by their position."""

    def compute(self, batch):
        weights = torch.arange(1, batch.batch_size + 1, dtype=batch.logprobs.dtype)[:, None]
        term = weights * batch.token_advantages() * batch.masked(batch.logprobs)
        return pgzoo.ObjectiveOutput(-pgzoo.aggregate(term, batch, "token-mean", clean=True), {})


class UndeclaredField(ExampleReinforce):
    """Reads ``rollout_logprobs`` without declaring them in ``requires``."""

    def compute(self, batch):
        w = torch.exp(batch.clean("old_logprobs") - batch.clean("rollout_logprobs")).clamp(max=2.0)
        term = w * batch.token_advantages() * batch.masked(batch.logprobs)
        return pgzoo.ObjectiveOutput(-pgzoo.aggregate(term, batch, "token-mean", clean=True), {})


class Cancellation(ExampleReinforce):
    """Takes the log-ratio as a difference of large numbers (log-probabilities offset by 1e4, as a difference of
    running sums would be): float32 keeps three of its digits, float64 eleven."""

    def compute(self, batch):
        log_r = (batch.masked(batch.logprobs) + 1e4) - (batch.clean("old_logprobs") + 1e4)
        term = batch.token_advantages() * torch.exp(log_r.clamp(-20, 20))
        return pgzoo.ObjectiveOutput(-pgzoo.aggregate(term, batch, "token-mean"), {})


class HalfPrecisionMetric(ExampleReinforce):
    """Returns its metric in the input's dtype (bfloat16 statistics lose most of their digits): it overrides
    ``__call__`` and so skips the base class's float32 computation of 16-bit inputs."""

    def __call__(self, batch):
        out = self.compute(batch.in_float32())
        if self.report_metrics:
            out.metrics["log_ratio/staleness_mean"] = out.metrics["log_ratio/staleness_mean"].to(
                batch.logprobs.dtype)
        return out


# broken objective -> the property tests it must fail (test function names in tests/test_objective_properties.py)
BROKEN = {
    "broken-reads-masked-positions": (ReadsMaskedPositions, {
        "test_masked_positions_never_matter", "test_padding_length_does_not_matter",
        "test_shard_without_tokens_contributes_zero", "test_random_shapes_and_fills"}),
    "broken-local-normaliser": (LocalNormaliser, {"test_micro_batch_gradients_add_up"}),
    "broken-counts-empty-rows": (CountsEmptyRows, {"test_fully_masked_rows_contribute_nothing"}),
    "broken-metrics-off-differs": (MetricsOffDiffers, {"test_metrics_off_is_bit_identical"}),
    "broken-undocumented-metric": (UndocumentedMetric, {"test_metrics_are_documented_detached_scalars"}),
    "broken-host-sync": (HostSync, {"test_no_host_sync", "test_compiles_to_one_graph"}),
    "broken-unclamped-ratio": (UnclampedRatio, {"test_extreme_log_ratios_stay_finite",
                                                "test_extreme_log_ratios_in_16_bit"}),
    "broken-cancellation": (Cancellation, {"test_float32_matches_float64"}),
    "broken-row-order": (RowOrder, {"test_permuting_rows_permutes_the_gradient"}),
    "broken-undeclared-field": (UndeclaredField, {"test_runs_on_its_required_fields_alone"}),
    "broken-half-precision-metric": (HalfPrecisionMetric, {"test_16_bit_inputs_give_finite_loss_and_float32_metrics"}),
}


def pytest_configure(config):
    for name, (cls, _) in BROKEN.items():
        pgzoo.register(name, cls)
