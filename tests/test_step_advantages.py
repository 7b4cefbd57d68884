"""Advantages under data parallelism: two gloo ranks, each holding its prompts of a step, get exactly the advantages
one process holding the whole step computes, for every estimator the trainer runs (batch-level ones included: gpg's
scale and reinforce++'s whitening see the whole batch, not a rank's half) and for per-token ones (reinforce++ with
gamma < 1: [n, T] on each rank, T its own completion columns). Real processes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import pgzoo

sys.path.insert(0, str(Path(__file__).parent))
import _adv_worker as W  # noqa: E402
from test_data_parallel import run_ranks  # noqa: E402

from pgzoo.adapters.lightning.loop_data import prefix_mask, step_advantages  # noqa: E402

WORKER = Path(__file__).parent / "_adv_worker.py"


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("adv")
    run_ranks([str(WORKER), str(out)], world=2, timeout=180)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def one_process(label: str) -> torch.Tensor:
    """The whole step's advantages in one process, as the trainer computes them there."""
    name, options = W.cases()[label]
    rewards, lengths = W.step_rows()
    return step_advantages(name, rewards, lengths, W.G, width=int(lengths.max()), options=options)


def rank_share(whole: torch.Tensor, rank: int) -> torch.Tensor:
    """A rank's rows of the whole step, per-token ones cut or zero-padded to that rank's completion columns."""
    mine = W.rank_rows(whole, rank, 2)
    if mine.dim() == 1:
        return mine
    width = W.width_of(W.rank_rows(W.step_rows()[1], rank, 2))
    return torch.nn.functional.pad(mine, (0, max(width - mine.shape[1], 0)))[:, :width]


@pytest.mark.parametrize("label", list(W.cases()))
def test_two_ranks_take_the_one_process_advantages(ranks, label):
    whole = one_process(label)
    for rank, result in enumerate(ranks):
        assert label in result, f"{label} was registered after the workers ran"
        torch.testing.assert_close(result[label][0], rank_share(whole, rank), rtol=0, atol=0)


def test_one_process_is_the_estimator_on_the_whole_step():
    """What the ranks are compared with is pgzoo.advantages.compute itself: [N] as it is, [N, T] on the masks of the
    right-padded completions."""
    rewards, lengths = W.step_rows()
    torch.testing.assert_close(one_process("gpg"), pgzoo.advantages.compute("gpg", rewards, group_size=W.G,
                                                                            lengths=lengths), rtol=0, atol=0)
    name, options = W.TOKEN_CASES["reinforce++ gamma=0.9"]
    mask = prefix_mask(lengths, int(lengths.max()))
    expected = pgzoo.advantages.compute(name, rewards, response_mask=mask, **options)
    assert expected.shape == mask.shape and bool((expected[mask == 0] == 0).all())
    torch.testing.assert_close(one_process("reinforce++ gamma=0.9"), expected, rtol=0, atol=0)


@pytest.mark.parametrize("label", ["gpg", "reinforce++", "reinforce++ gamma=0.9"])
def test_the_control_a_rank_alone_differs_for_batch_estimators(ranks, label):
    """Computed on a rank's half, the batch-level estimators give other advantages: the test above can fail."""
    whole = one_process(label)
    assert any(not torch.equal(result[label][1], rank_share(whole, rank)) for rank, result in enumerate(ranks))
