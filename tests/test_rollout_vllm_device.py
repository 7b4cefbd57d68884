"""VLLMEngine(device="cuda:N") / rollout.device for the vLLM engine (pgzoo.rollout.vllm_device): strict values, the
refusals, the logical -> physical mapping vLLM applies to what pgzoo passes, and, with vLLM's CPU build, that the
assignment reaches vLLM's engine core process while the trainer's process keeps its environment.

None of this runs vLLM on a GPU here: benchmarks/gpu_check.py checks 5 and 6 do, on a machine with two GPUs.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from pgzoo.errors import ConfigError
from pgzoo.rollout.vllm_device import check_engine_device, cuda_index, vllm_device_args

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from pgzoo.models.tiny import build_tiny_moe, build_tokenizer, save_pretrained

    path = tmp_path_factory.mktemp("tiny_moe_device")
    save_pretrained(build_tiny_moe(len(build_tokenizer()), seed=0), build_tokenizer(), path)
    return path


# -- strict values and refusals --------------------------------------------------------------------------------------
def test_device_is_a_cuda_n_string_or_none():
    assert cuda_index(None) is None and cuda_index("cuda:0") == 0 and cuda_index("cuda:12") == 12
    for bad in ("cuda", "cuda:", "cuda:-1", "cuda:01", "cuda:1 ", "CUDA:1", "cpu", "cuda:1,2", 1,
                torch.device("cuda:1"), True):
        with pytest.raises(ConfigError, match=r"device=.*rollout\.device.*'cuda:N'"):
            cuda_index(bad)


def test_placement_refusals():
    check_engine_device(1, engine_process=True, visible=2, current=None)
    check_engine_device(1, engine_process=False, visible=2, current=1)  # the trainer's own device, in process
    with pytest.raises(ConfigError, match=r"cuda:2.*sees 2 GPU\(s\)"):
        check_engine_device(2, engine_process=True, visible=2, current=None)
    with pytest.raises(ConfigError, match=r"cuda:1' with engine_process=False.*trainer's is cuda:0.*"
                                          r"engine_process=True"):
        check_engine_device(1, engine_process=False, visible=2, current=0)


@needs_vllm
def test_engine_refuses_before_vllm_starts(checkpoint):
    """The CPU build has no CUDA device; arguments that place workers otherwise are refused with device."""
    from pgzoo.rollout import VLLMEngine

    with pytest.raises(ConfigError, match=r"device='cuda:1'.*CPU build.*device=None"):
        VLLMEngine(checkpoint, device="cuda:1", engine_process=True)
    with pytest.raises(ConfigError, match=r"'cuda:N'"):
        VLLMEngine(checkpoint, device="gpu1", engine_process=True)
    for kw, match in (({"device_ids": [1]}, "give one of the two"), ({"tensor_parallel_size": 2}, "one worker"),
                      ({"distributed_executor_backend": "external_launcher"}, "trainer's own processes")):
        with pytest.raises(ConfigError, match=match):
            VLLMEngine(checkpoint, device="cuda:1", **kw)


@needs_vllm
def test_device_args_are_vllms_device_ids_and_need_a_vllm_that_has_them():
    import dataclasses

    from pgzoo.errors import DependencyError

    assert vllm_device_args(3) == {"device_ids": [3]}

    @dataclasses.dataclass
    class OlderEngineArgs:  # a vLLM before device_ids: the fields are what is read
        model: str = ""

    with pytest.raises(DependencyError, match=r"device_ids engine argument.*lacks.*upgrade vLLM"):
        vllm_device_args(1, OlderEngineArgs)


@needs_vllm
def test_vllm_maps_the_trainers_logical_index_through_cuda_visible_devices(checkpoint, monkeypatch):
    """pgzoo passes the trainer's own cuda:N; vLLM reads it as an index into CUDA_VISIBLE_DEVICES. vLLM's
    resolution runs as on a CUDA build: its platform is told the variable CUDA builds read (the CPU build's platform
    reads its memory-node variable instead)."""
    from vllm import envs
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms import current_platform

    if hasattr(envs, "disable_envs_cache"):
        envs.disable_envs_cache()
    monkeypatch.setattr(current_platform, "device_control_env_var", "CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert EngineArgs(model=str(checkpoint), **vllm_device_args(1))._resolve_device_ids() == [5]
    assert EngineArgs(model=str(checkpoint), **vllm_device_args(0))._resolve_device_ids() == [3]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert EngineArgs(model=str(checkpoint), **vllm_device_args(1))._resolve_device_ids() == [1]


# -- the builder (pgzoo train) ---------------------------------------------------------------------------------------
def _build(monkeypatch, overrides, *, local_rank=0, world_size=1, cuda=True):
    """Run the vllm builder with VLLMEngine replaced by a recorder of its arguments (the refusals come first)."""
    import pgzoo.rollout.builders as builders
    from pgzoo.recipes import load_recipe

    recipe = load_recipe("tiny/minirl", ["rollout.engine=vllm", *overrides])
    built = []
    monkeypatch.setattr(builders, "VLLMEngine", lambda *a, **kw: built.append(kw) or kw)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    builders.engines.build("vllm", recipe.rollout, "ckpt", seed=0, return_routes=False, world_size=world_size)
    return built[0]


def test_builder_places_vllm_on_rollout_device_and_lifts_the_refusals(monkeypatch):
    kw = _build(monkeypatch, ["rollout.device=cuda:1", "rollout.weight_transfer=nccl"])
    assert kw["device"] == "cuda:1" and kw["engine_process"] and kw["weight_transfer"] == "nccl"
    # several GPU ranks, k >= 1: each rank's engine on its own GPU (rank 1 of 2 -> cuda:3)
    kw = _build(monkeypatch, ["rollout.max_staleness=1", "rollout.device=cuda:{local_rank+2}", "train.devices=2",
                              "rollout.weight_transfer=nccl"], local_rank=1, world_size=2)
    assert kw["device"] == "cuda:3" and kw["engine_process"]
    assert "device" not in _build(monkeypatch, [], cuda=False)  # no rollout.device: vLLM's default, as before


@pytest.mark.parametrize("overrides, local_rank, world_size, match", [
    (["rollout.weight_transfer=nccl"], 0, 1, r"trains on cuda:0 and without rollout\.device.*cuda:0.*NCCL cannot "
                                             r"hold two ranks on one GPU.*rollout\.device"),
    (["rollout.weight_transfer=nccl", "rollout.device=cuda:{local_rank}", "train.devices=2"], 1, 2,
     r"trains on cuda:1 and rollout\.device=cuda:\{local_rank\} puts this rank's vLLM on cuda:1.*NCCL cannot"),
    (["rollout.max_staleness=1", "train.devices=2"], 0, 2,
     r"max_staleness=1 on 2 GPU ranks.*first GPU.*rollout\.device='cuda:\{local_rank\+N\}'"),
])
def test_builder_refuses_vllm_on_a_gpu_it_must_not_share(monkeypatch, overrides, local_rank, world_size, match):
    with pytest.raises(ConfigError, match=match):
        _build(monkeypatch, overrides, local_rank=local_rank, world_size=world_size)


def test_recipe_accepts_rollout_device_for_vllm():
    from pgzoo.recipes import load_recipe
    from pgzoo.rollout.builders import capabilities_of

    assert capabilities_of("vllm").device_choice
    assert load_recipe("tiny/minirl", ["rollout.engine=vllm", "rollout.device=cuda:1"]).rollout.device == "cuda:1"
    with pytest.raises(ConfigError, match=r"rollout\.device=cuda:1: every one of the 2 ranks"):
        load_recipe("tiny/minirl", ["rollout.engine=vllm", "rollout.device=cuda:1", "train.devices=2"])


@pytest.mark.parametrize("engine", ["vllm", "transformers"])
def test_recipe_refuses_an_engine_on_another_ranks_training_gpu(engine):
    """Ranks of a machine train on cuda:0..devices-1: cuda:{local_rank+1} beside 2 ranks puts rank 0's engine on rank
    1's GPU (refused, naming both ranks and the fix); cuda:{local_rank+2} and, for the transformers engine, the CPU
    pass, as does one's own GPU (the shared-device case, warned at run time)."""
    from pgzoo.recipes import load_recipe

    base = [f"rollout.engine={engine}", "train.devices=2", "rollout.max_staleness=1"]
    with pytest.raises(ConfigError, match=r"rank 0's engine would sample on cuda:1, where rank 1 trains.*"
                                          r"cuda:\{local_rank\+2\}"):
        load_recipe("tiny/minirl", [*base, "rollout.device=cuda:{local_rank+1}"])
    with pytest.raises(ConfigError, match=r"rank 0's engine would sample on cuda:3, where rank 3 trains"):
        load_recipe("tiny/minirl", [f"rollout.engine={engine}", "train.devices=4", "rollout.device=cuda:{local_rank+3}"])
    assert load_recipe("tiny/minirl", [*base, "rollout.device=cuda:{local_rank+2}"]).rollout.device
    assert load_recipe("tiny/minirl", [*base, "rollout.device=cuda:{local_rank}"]).rollout.device


# -- one engine start: the assignment reaches the engine core process ------------------------------------------------
@needs_vllm
@pytest.mark.vllm
@pytest.mark.slow  # one vLLM engine start (~10-30 s)
def test_engine_core_process_gets_the_gpu_and_the_trainers_environment_stays(checkpoint, monkeypatch):
    """vLLM's CPU build with engine_process=True and the arguments device='cuda:1' becomes: the engine core process
    holds the assignment vLLM's GPU worker reads to pick its device (ParallelConfig.assigned_physical_gpu_ids), and
    inherits CUDA_VISIBLE_DEVICES whole; the trainer's CUDA_VISIBLE_DEVICES is the same before and after, and no
    assignment was recorded in its process (vLLM itself sets other variables there when it starts, device or not)."""
    from vllm.platforms.interface import get_assigned_physical_gpu_ids

    from pgzoo.rollout import VLLMEngine

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")  # the trainer's own view (unused by the CPU build)
    before = dict(os.environ)
    engine = VLLMEngine(checkpoint, dtype="float32", engine_process=True, **vllm_device_args(1))
    try:
        after = dict(os.environ)
        pid, assigned = engine.llm.collective_rpc(
            lambda worker: (os.getpid(), worker.vllm_config.parallel_config.assigned_physical_gpu_ids))[0]
        assert pid == engine.engine_core_info()["pid"] != os.getpid()
        assert assigned == [1]
        environ = dict(item.split("=", 1) for item in
                       Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0") if "=" in item)
        assert environ["CUDA_VISIBLE_DEVICES"] == "3,5"
        assert after["CUDA_VISIBLE_DEVICES"] == before["CUDA_VISIBLE_DEVICES"] == "3,5"
        assert get_assigned_physical_gpu_ids() is None
    finally:
        engine.close()
