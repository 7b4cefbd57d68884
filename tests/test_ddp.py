"""DDP equality: two gloo processes, each holding half of every mini-batch, take the same parameter update as one
process holding all of it (global normalisers + summed gradients), for sequence- and token-normalised objectives,
off-policy N = 2, with gradient accumulation."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

OBJECTIVES = ("minirl", "dapo", "minirl-length-norm")


def _batch(seed: int = 0):
    """8 rows (2 mini-batches x 2 ranks x 2 rows) of synthetic rollouts with ragged prompts and completions."""
    from pgzoo.adapters.lightning import RolloutBatch

    g = torch.Generator().manual_seed(seed)
    n, P, T = 8, 5, 6
    prompt_ids = torch.randint(4, 90, (n, P), generator=g)
    prompt_len = torch.randint(2, P + 1, (n,), generator=g)
    prompt_mask = torch.arange(P)[None] >= (P - prompt_len)[:, None]
    prompt_ids = torch.where(prompt_mask, prompt_ids, torch.zeros_like(prompt_ids))
    comp_len = torch.tensor([6, 1, 3, 5, 2, 6, 4, 1])
    completion_mask = torch.arange(T)[None] < comp_len[:, None]
    completion_ids = torch.where(completion_mask, torch.randint(4, 90, (n, T), generator=g), torch.zeros(n, T).long())
    mu = torch.where(completion_mask, -torch.rand(n, T, generator=g) * 3 - 2, torch.zeros(n, T))
    adv = torch.randn(n, generator=g)
    return RolloutBatch(prompt_ids, prompt_mask, completion_ids, completion_mask, mu, adv, adv.clone(),
                        torch.zeros(n, dtype=torch.bool))


def _sgd_module(*args):
    """RLModule with plain SGD: Adam's first step is ~lr·sign(g), which turns float-rounding noise in near-zero
    gradients into lr-sized differences; SGD shows the gradient itself."""
    from pgzoo.adapters.lightning import RLModule

    class SGDModule(RLModule):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.policy.parameters(), lr=self.cfg.lr)
            return [opt], [torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)]

    return SGDModule(*args)


def _update(objective: str, data, micro: int | None):
    import pgzoo
    from pgzoo.adapters.lightning import LoopConfig
    from pgzoo.models import build_tiny_moe

    torch.manual_seed(0)
    model = build_tiny_moe(vocab_size=100, seed=0)
    cfg = LoopConfig(num_minibatches=2, micro_batch_size=micro, lr=1.0, grad_clip=None, max_new_tokens=6,
                     group_size=2, prompts_per_step=4)
    module = _sgd_module(model, None, pgzoo.get(objective), None, None, cfg)
    module.update(data)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _rank_rows(rank: int, world: int = 2, n: int = 8, num_minibatches: int = 2) -> list[int]:
    per_mb = n // num_minibatches
    share = per_mb // world
    return [m * per_mb + rank * share + i for m in range(num_minibatches) for i in range(share)]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        data = _batch()
        rows = torch.tensor(_rank_rows(rank, world))
        from pgzoo.adapters.lightning import RolloutBatch

        mine = RolloutBatch(**{k: (v[rows] if isinstance(v, torch.Tensor) else v) for k, v in data.__dict__.items()})
        for objective in OBJECTIVES:
            state = _update(objective, mine, micro=1 if objective == "dapo" else None)
            torch.save(state, os.path.join(out_dir, f"{objective}-rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_states(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.start_processes(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True, start_method="spawn")
    return out


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_two_process_update_equals_single_process(ddp_states, objective):
    torch.set_num_threads(1)
    single = _update(objective, _batch(), micro=None)
    r0 = torch.load(ddp_states / f"{objective}-rank0.pt")
    r1 = torch.load(ddp_states / f"{objective}-rank1.pt")
    moved = 0.0
    from pgzoo.models import build_tiny_moe

    init = build_tiny_moe(vocab_size=100, seed=0).state_dict()
    for k in single:
        torch.testing.assert_close(r0[k], r1[k], atol=0, rtol=0)  # ranks agree exactly (same summed gradient)
        torch.testing.assert_close(r0[k], single[k], atol=1e-6, rtol=1e-5)
        moved += float((single[k] - init[k]).abs().sum())
    assert moved > 1e-3  # the update is not a no-op


def test_local_normalisers_would_differ():
    """The check above can fail: averaging per-rank losses (local normalisers) gives another update for dapo."""
    import pgzoo
    from pgzoo.adapters.lightning import LoopConfig, RolloutBatch
    from pgzoo.models import build_tiny_moe

    data = _batch()
    single = _update("dapo", data, micro=None)
    torch.manual_seed(0)
    model = build_tiny_moe(vocab_size=100, seed=0)
    cfg = LoopConfig(num_minibatches=2, lr=1.0, grad_clip=None, max_new_tokens=6, group_size=2)
    module = _sgd_module(model, None, pgzoo.get("dapo"), None, None, cfg)
    # one mini-batch at a time, each "rank" half normalised by its own token count, gradients averaged
    (opt,), _ = module.configure_optimizers()
    for m in range(2):
        opt.zero_grad()
        for r in range(2):
            rows = torch.tensor([m * 4 + r * 2, m * 4 + r * 2 + 1])
            mb = RolloutBatch(**{k: (v[rows] if isinstance(v, torch.Tensor) else v) for k, v in data.__dict__.items()})
            lp, _ = module.forward_logprobs(mb)
            batch = pgzoo.TokenBatch(logprobs=lp, mask=mb.completion_mask, advantages=mb.advantages,
                                     rollout_logprobs=mb.rollout_logprobs)
            (pgzoo.get("dapo")(batch).loss / 2).backward()
        opt.step()
    diff = sum(float((model.state_dict()[k] - single[k]).abs().max()) for k in single)
    assert diff > 1e-4
