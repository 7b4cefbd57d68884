"""Every objective traces into one torch.compile graph (no graph breaks, no host sync), metrics included."""

from __future__ import annotations

import pytest
import torch

import pgzoo
from pgzoo.testing import random_batch

NAMES = [
    "minirl", "minirl-no-clip", "minirl-length-norm", "minirl-no-is",
    "grpo", "dr-grpo", "dapo", "cispo", "gspo", "gspo-token",
]


def assert_one_graph(obj, ref, fields=("old_logprobs", "rollout_logprobs", "ref_logprobs")) -> None:
    """``obj`` on the batch ``ref`` (its ``fields`` passed as tensors) traces into one torch.compile graph and gives the
    eager loss, gradient and metrics."""
    torch._dynamo.reset()

    def step(lp, mask, adv, *tensors):
        batch = pgzoo.TokenBatch(logprobs=lp, mask=mask, advantages=adv, check_values=False,
                                 **dict(zip(fields, tensors)))
        out = obj(batch)
        return out.loss, out.metrics

    # backend="eager": trace only (fast); fullgraph=True turns any graph break into an error
    compiled = torch.compile(step, backend="eager", fullgraph=True)
    args = (ref.mask, ref.advantages, *(getattr(ref, f) for f in fields))
    lp_c = ref.logprobs.detach().clone().requires_grad_(True)
    lp_e = ref.logprobs.detach().clone().requires_grad_(True)
    loss_c, metrics_c = compiled(lp_c, *args)
    loss_e, metrics_e = step(lp_e, *args)
    loss_c.backward()
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(lp_c.grad, lp_e.grad)
    assert metrics_c.keys() == metrics_e.keys()
    for key in metrics_e:
        torch.testing.assert_close(metrics_c[key], metrics_e[key], msg=key)


@pytest.mark.parametrize("name", NAMES)
def test_objective_compiles_to_one_graph(name):
    kwargs = {} if name.startswith("minirl") else {
        "correction": {"level": "sequence" if name == "gspo" else "token", "mode": "mask"}}
    assert_one_graph(pgzoo.get(name, **kwargs), random_batch(4, 6, seed=0, scale=0.3, pad_value=float("nan")))
