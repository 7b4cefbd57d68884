"""Data parallelism takes the single-process step: two gloo processes under Lightning's DDP and FSDP2 strategies,
each holding its half of every mini-batch, end one optimizer step with the parameters of one process holding all of
it (max |Δθ| <= 1e-5 in float32), for minirl and dapo, with gradient accumulation (micro-batches of 1), N = 2
mini-batches, with and without R2 routing replay on the tiny MoE (FSDP: replay hooks on sharded decoder layers).
A control shows that rank-local normalisers would give another step."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _dp_worker as W  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
WORKER = Path(__file__).parent / "_dp_worker.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_env(rank: int, world: int, port: int, **extra) -> dict[str, str]:
    """The environment torchrun gives rank ``rank`` of ``world`` on one node (Lightning detects torchelastic)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "TORCHELASTIC_RUN_ID": f"pgzoo-test-{port}", "RANK": str(rank),
            "LOCAL_RANK": str(rank), "GROUP_RANK": "0", "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), **extra}


def run_ranks(args: list[str], world: int = 2, timeout: float = 300) -> None:
    port = free_port()
    procs = [subprocess.Popen([sys.executable, *args], env=torchrun_env(r, world, port), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(world)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]


def single_process(objective: str, replay: str | None):
    m = W.module(objective, replay)
    metrics = m.update(W.batch())
    return {k: v.detach().clone() for k, v in m.policy.state_dict().items()}, metrics


@pytest.fixture(scope="module", params=["ddp", "fsdp"])
def two_rank_states(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    run_ranks([str(WORKER), request.param, str(out)])
    return request.param, out


@pytest.mark.slow
@pytest.mark.parametrize("objective,replay", W.CASES)
def test_two_ranks_take_the_single_process_step(two_rank_states, objective, replay):
    strategy, out = two_rank_states
    got = torch.load(out / f"{strategy}-{objective}-{replay}.pt", weights_only=False)
    single, metrics = single_process(objective, replay)
    from pgzoo.models import build_tiny_moe

    init = build_tiny_moe(vocab_size=100, seed=0).state_dict()
    assert set(got["state"]) == set(single)
    worst = max(float((got["state"][k].float() - single[k].float()).abs().max()) for k in single)
    assert worst <= 1e-5, f"{strategy} {objective} {replay}: max |Δθ| = {worst:.3g}"
    moved = max(float((single[k] - init[k]).abs().max()) for k in single)
    assert moved > 1e-3  # the step is not a no-op
    if replay is not None:
        assert got["metrics"]["routing/layers_hit"] >= 1  # replay forced the (sharded) MoE layers on every rank
    # the step's diagnostics are global too: the same loss and gradient norm as one process
    for key in ("loss", "grad_norm"):
        assert got["metrics"][key] == pytest.approx(metrics[key], rel=1e-5, abs=1e-6), key


def test_rank_local_normalisers_would_differ():
    """The check above can fail: normalising each rank's half of a mini-batch by its own token count (gradients
    averaged over the two halves, as DDP would without the global sums) gives another step for dapo."""
    import pgzoo
    from pgzoo.adapters.lightning.loop_data import RolloutBatch

    data = W.batch()
    single, _ = single_process("dapo", None)
    m = W.module("dapo", None)
    (opt,), _ = m.configure_optimizers()
    for mini in range(2):
        opt.zero_grad()
        for rank in range(2):
            rows = torch.tensor([mini * 4 + rank * 2, mini * 4 + rank * 2 + 1])
            mb = RolloutBatch(**{k: (v[rows] if isinstance(v, torch.Tensor) else v) for k, v in data.__dict__.items()})
            lp, _ = m.forward_logprobs(mb)
            batch = pgzoo.TokenBatch(logprobs=lp, mask=mb.completion_mask, advantages=mb.advantages,
                                     rollout_logprobs=mb.rollout_logprobs, max_tokens=6)  # local normalisers
            (pgzoo.get("dapo")(batch).loss / 2).backward()
        opt.step()
    diff = max(float((m.policy.state_dict()[k] - single[k]).abs().max()) for k in single)
    assert diff > 1e-4
