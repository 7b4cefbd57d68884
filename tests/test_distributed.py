"""pgzoo.adapters.lightning.distributed and the recipe keys of data parallelism: the strategy handed to Lightning, the combinations that
cannot run, the rank before any process group, and FSDP2 sharding of the tiny MoE (one gloo rank in this process:
logprobs, gradients and routing replay through sharded decoder layers, with activation checkpointing)."""

from __future__ import annotations

import socket

import pytest
import torch

from pgzoo.errors import ConfigError
from pgzoo.recipes import recipe_from_dict

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _recipe(**train):
    return recipe_from_dict({"rollout": {"prompts_per_step": 4, "group_size": 2}, "train": train})


def test_strategy_resolution_and_trainer_keywords():
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    from pgzoo.adapters.lightning.distributed import trainer_parallelism

    assert _recipe().strategy == "single" and _recipe(devices=2).strategy == "ddp"
    assert _recipe(devices=2, num_nodes=2).world_size == 4
    kw = trainer_parallelism(_recipe(devices=2))
    assert isinstance(kw["strategy"], DDPStrategy) and kw["devices"] == 2 and kw["num_nodes"] == 1
    kw = trainer_parallelism(_recipe(strategy="fsdp", devices=2))
    assert isinstance(kw["strategy"], ModelParallelStrategy)
    assert trainer_parallelism(_recipe())["strategy"] == "auto"


@pytest.mark.parametrize("train, match", [
    ({"devices": 3}, "ranks do not divide rollout.prompts_per_step"),
    ({"mixed_precision": True}, "FSDP option"),
    ({"activation_checkpointing": True, "devices": 2}, "set train.strategy=fsdp"),
    ({"strategy": "cuda"}, "train.strategy"),
    ({"num_nodes": 0}, "train.num_nodes"),
])
def test_combinations_that_cannot_run_name_the_fix(train, match):
    with pytest.raises(ConfigError, match=match):
        _recipe(**train)


def test_env_rank(monkeypatch):
    from pgzoo.adapters.lightning.distributed import env_rank

    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert env_rank() == 0
    monkeypatch.setenv("LOCAL_RANK", "1")  # a child of Lightning's launcher
    assert env_rank() == 1
    monkeypatch.setenv("RANK", "3")  # torchrun
    assert env_rank() == 3


@pytest.fixture()
def one_rank_group(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        yield init_device_mesh("cpu", (1,))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_sharded_policy_gives_the_same_logprobs_gradients_and_replay(one_rank_group, checkpointing):
    from pgzoo.adapters.lightning.distributed import full_state_dict, is_sharded, shard_policy
    from pgzoo.rollout.sync import iter_sync_tensors
    from pgzoo.models.logprobs import completion_logprobs
    from pgzoo.models import build_tiny_moe
    from pgzoo.routing import RoutingReplay

    g = torch.Generator().manual_seed(0)
    prompt, comp = torch.randint(4, 90, (3, 5), generator=g), torch.randint(4, 90, (3, 4), generator=g)
    pm, cm = torch.ones_like(prompt, dtype=torch.bool), torch.ones_like(comp, dtype=torch.bool)
    mask = torch.cat([pm, cm], 1)
    results = []
    for shard in (False, True):
        model = build_tiny_moe(vocab_size=100, seed=0).train()
        if shard:
            shard_policy(model, one_rank_group, activation_checkpointing=checkpointing)
            assert is_sharded(model)
        replay = RoutingReplay("R2")
        replay.start_batch(None)
        with torch.no_grad(), replay.old_pass(model, mask=mask):
            completion_logprobs(model, prompt, pm, comp, cm)
        with replay.update_pass(model, mask=mask):
            lp = completion_logprobs(model, prompt, pm, comp, cm).logprobs
            lp.sum().backward()
        assert float(replay.metrics()["routing/layers_hit"]) >= 1  # the hooks ran inside sharded layers
        grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                 for n, p in model.named_parameters()}
        results.append((lp.detach(), grads, full_state_dict(model),
                        {k: v.clone() for k, v in iter_sync_tensors(model)}))
    (lp0, g0, s0, c0), (lp1, g1, s1, c1) = results
    torch.testing.assert_close(lp1, lp0, rtol=1e-5, atol=1e-6)
    names = {n.replace("_checkpoint_wrapped_module.", "") for n in g1}
    assert names == set(g0)
    for n, v in g1.items():
        torch.testing.assert_close(v, g0[n.replace("_checkpoint_wrapped_module.", "")], rtol=1e-4, atol=1e-6)
    assert set(s1) == set(s0)  # the consolidated state has the unsharded model's names
    for k in s0:
        torch.testing.assert_close(s1[k], s0[k])
    assert set(c1) == set(c0)  # what an engine receives from the shards is what it receives from the plain model
    for k in c0:
        torch.testing.assert_close(c1[k], c0[k])


def test_importing_the_trainer_module_does_not_import_lightning():
    """`pgzoo train --help` stays fast: Lightning is imported inside the functions that use it."""
    import subprocess
    import sys

    code = "import sys, pgzoo.adapters.lightning.run, pgzoo.cli.main, pgzoo.cli.train; assert not any(m.startswith('lightning') for m in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0
