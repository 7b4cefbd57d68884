"""Advantages under data parallelism: two gloo ranks, each holding its prompts of a step, get exactly the advantages
one process holding the whole step computes, for every registered estimator (batch-level ones included: gpg's
scale and reinforce++'s whitening see the whole batch, not a rank's half). Real processes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import pgzoo

sys.path.insert(0, str(Path(__file__).parent))
import _adv_worker as W  # noqa: E402
from test_data_parallel import run_ranks  # noqa: E402

WORKER = Path(__file__).parent / "_adv_worker.py"


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("adv")
    run_ranks([str(WORKER), str(out)], world=2, timeout=180)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("name", pgzoo.advantages.trainer_estimators())
def test_two_ranks_take_the_one_process_advantages(ranks, name):
    rewards, lengths = W.step_rows()
    whole = pgzoo.advantages.compute(name, rewards, group_size=W.G, lengths=lengths)
    for rank, result in enumerate(ranks):
        assert name in result, f"{name} was registered after the workers ran"
        torch.testing.assert_close(result[name][0], W.rank_rows(whole, rank, 2), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["gpg", "reinforce++"])
def test_the_control_a_rank_alone_differs_for_batch_estimators(ranks, name):
    """Computed on a rank's half, the batch-level estimators give other advantages: the test above can fail."""
    rewards, lengths = W.step_rows()
    whole = pgzoo.advantages.compute(name, rewards, group_size=W.G, lengths=lengths)
    assert any(not torch.equal(result[name][1], W.rank_rows(whole, rank, 2)) for rank, result in enumerate(ranks))
