"""VLLMEngine(weight_transfer="nccl"): the refusals, and the control flow of vLLM's own NCCL trainer engine driven
through pgzoo's sync, on CPU.

vLLM's ``NCCLTrainerWeightTransferEngine`` runs unchanged except where it would open NCCL: its trainer endpoint and
its packed broadcast are replaced by recorders. The ``vllm.LLM`` is a fake whose ``collective_rpc`` records the
worker calls (the five control calls of vLLM's ``VLLMWeightSyncClient`` protocol arrive there by name). What runs on a
GPU is benchmarks/gpu_check.py's "vllm nccl weight transfer" check.
"""

from __future__ import annotations

import importlib.util
import types

import pytest
import torch

from pgzoo.errors import ConfigError, EngineError
from pgzoo.models.tiny import build_tiny_moe, build_tokenizer, save_pretrained

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vllm is not installed (pip install 'pgzoo[cpu]' or 'pgzoo[vllm]')"),
]

CONTROL = ("init_weight_transfer_engine", "start_weight_update", "update_weights", "finish_weight_update",
           "shutdown_weight_transfer_engine")


class FakeLLM:
    """Stands in for ``vllm.LLM``: records ``collective_rpc`` calls (by worker method name), raises what ``fail``
    holds for a method once, and samples one token per completion."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.calls: list[tuple[str, dict | None]] = []
        self.fail: dict[str, BaseException] = {}
        self.worker_gpus = ["GPU-vllm"]
        self.llm_engine = types.SimpleNamespace(
            model_config=types.SimpleNamespace(max_model_len=kwargs["max_model_len"]),
            engine_core=types.SimpleNamespace(shutdown=lambda: None))

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        name = method if isinstance(method, str) else method.__name__
        self.calls.append((name, kwargs))
        if name in self.fail:
            raise self.fail.pop(name)
        return list(self.worker_gpus) if name == "worker_gpu" else [None]

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache", None))

    def enqueue(self, requests, params, use_tqdm=False):
        """What VLLMEngine.generate calls (LLM.enqueue, then llm_engine.step() until done): every request finishes
        in one step with token 5."""
        self.calls.append(("generate", None))
        comp = types.SimpleNamespace(index=0, token_ids=[5], finish_reason="length",
                                     logprobs=types.SimpleNamespace(logprobs=[-1.0], start_indices=[0]))
        pending = [types.SimpleNamespace(request_id=str(i), finished=True, outputs=[comp])
                   for i in range(len(requests))]
        self.llm_engine = types.SimpleNamespace(has_unfinished_requests=lambda: bool(pending),
                                                step=lambda: [pending.pop() for _ in range(len(pending))])
        return [f"{i}-internal" for i in range(len(requests))]

    def rpc_names(self):
        return [name for name, _ in self.calls if name in CONTROL or name in ("worker_gpu", "reset_prefix_cache")]


@pytest.fixture(scope="module")
def policy():
    return build_tiny_moe(len(build_tokenizer()), seed=0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, policy):
    path = tmp_path_factory.mktemp("tiny_moe_nccl")
    save_pretrained(policy, build_tokenizer(), path)
    return path


@pytest.fixture
def nccl(monkeypatch):
    """vLLM as a GPU build with a fake LLM; vLLM's NCCL endpoint and packed broadcast replaced by recorders."""
    import vllm
    import vllm.platforms
    from vllm.distributed.weight_transfer import nccl_engine

    from pgzoo.rollout import vllm_weight_transfer

    record = types.SimpleNamespace(endpoints=[], sent=[], destroyed=0, llms=[])

    class Group:
        def destroy(self):
            record.destroyed += 1

    def open_endpoint(info, rank=0):
        record.endpoints.append(info)
        return Group()

    def broadcast(iterator, group, src, post_iter_func, buffer_size_bytes, num_buffers):
        assert isinstance(group, Group) and src == 0
        record.sent.append([(name, post_iter_func((name, t)).clone()) for name, t in iterator])

    def fake_llm(**kwargs):
        llm = FakeLLM(**kwargs)
        record.llms.append(llm)
        return llm

    monkeypatch.setattr(vllm, "LLM", fake_llm)
    monkeypatch.setattr(vllm.platforms, "current_platform", types.SimpleNamespace(is_cpu=lambda: False))
    monkeypatch.setattr(nccl_engine, "open_trainer_endpoint", open_endpoint)
    monkeypatch.setattr(nccl_engine, "packed_nccl_broadcast_producer", broadcast)
    monkeypatch.setattr(vllm_weight_transfer, "trainer_device", lambda tensor: torch.device("cpu"))
    monkeypatch.setattr(vllm_weight_transfer, "trainer_gpu", lambda device: "GPU-trainer")
    return record


def build(checkpoint, **kw):
    from pgzoo.rollout import VLLMEngine

    return VLLMEngine(checkpoint, dtype=kw.pop("dtype", "bfloat16"), weight_transfer="nccl", **kw)


def perturbed(policy, scale):
    """A copy of ``policy`` whose every floating weight moved by ``scale`` (so a sync carries new values)."""
    import copy

    other = copy.deepcopy(policy)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale)
    return other


# -- refusals -------------------------------------------------------------------------------------------------------
def test_cpu_build_refuses_nccl_before_vllm_starts(checkpoint):
    from pgzoo.rollout import VLLMEngine

    with pytest.raises(ConfigError, match=r"rollout\.weight_transfer.*CPU build.*weight_transfer=None"):
        VLLMEngine(checkpoint, weight_transfer="nccl")
    with pytest.raises(ConfigError, match=r"weight_transfer='ipc'.*'nccl'"):
        VLLMEngine(checkpoint, weight_transfer="ipc")


def test_external_launcher_refused(nccl, checkpoint):
    with pytest.raises(ConfigError, match="external_launcher.*one GPU"):
        build(checkpoint, distributed_executor_backend="external_launcher")
    assert nccl.llms == []  # refused before vLLM was asked to start


def test_trainer_on_a_workers_gpu_refused_before_the_rendezvous(nccl, checkpoint, policy, monkeypatch):
    engine = build(checkpoint)
    engine.llm.worker_gpus = ["GPU-trainer"]
    with pytest.raises(ConfigError, match="NCCL cannot hold two ranks on one GPU"):
        engine.load_weights(policy)
    assert engine.llm.rpc_names() == ["worker_gpu"] and nccl.endpoints == []
    engine.generate([[1, 2]], max_new_tokens=1)  # nothing moved: the engine keeps its weights


def test_recipe_setting_checked_at_load_and_on_this_machine(monkeypatch):
    from pgzoo.recipes import load_recipe

    with pytest.raises(ConfigError, match=r"rollout\.weight_transfer=nccl: rollout\.engine=transformers does not "
                                          r"declare.*rollout\.engine=vllm"):
        load_recipe("tiny/minirl", ["rollout.engine=transformers", "rollout.weight_transfer=nccl"])
    with pytest.raises(ConfigError, match="rollout.weight_transfer"):
        load_recipe("tiny/minirl", ["rollout.weight_transfer=ipc"])
    recipe = load_recipe("tiny/minirl", ["rollout.engine=vllm", "rollout.weight_transfer=nccl"])
    assert recipe.rollout.weight_transfer == "nccl"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA device; set rollout.weight_transfer=null"):
        recipe.check_environment()


def test_builder_refuses_rank_zero_sharing_the_gpu(monkeypatch, checkpoint):
    from pgzoo.recipes import load_recipe
    from pgzoo.rollout.builders import engines

    recipe = load_recipe("tiny/minirl", ["rollout.engine=vllm", "rollout.weight_transfer=nccl"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("SLURM_LOCALID", raising=False)
    with pytest.raises(ConfigError, match="trains on cuda:0.*NCCL cannot hold two ranks on one GPU"):
        engines.get("vllm")(recipe.rollout, checkpoint)


def test_capabilities_declare_the_backend():
    from pgzoo.rollout.builders import capabilities_of
    from pgzoo.rollout.capabilities import EngineCapabilities

    assert capabilities_of("vllm").weight_transfer == ("nccl",)
    assert capabilities_of("transformers").weight_transfer == ()
    with pytest.raises(ConfigError, match="weight_transfer"):
        EngineCapabilities(weight_transfer="nccl")


# -- control flow ---------------------------------------------------------------------------------------------------
def test_init_once_then_start_update_finish_per_sync(nccl, checkpoint, policy):
    from pgzoo.rollout.sync import sync_plan

    engine = build(checkpoint)
    assert engine.llm.kwargs["weight_transfer_config"].backend == "nccl"
    engine.load_weights(policy)
    moved = perturbed(policy, 0.01)
    engine.load_weights(moved)
    assert engine.llm.rpc_names() == ["worker_gpu", "init_weight_transfer_engine",
                                      "start_weight_update", "update_weights", "finish_weight_update",
                                      "reset_prefix_cache",
                                      "start_weight_update", "update_weights", "finish_weight_update",
                                      "reset_prefix_cache"]
    (info,) = nccl.endpoints
    assert info.world_size == 2 and info.rank == 0 and info.packed  # the trainer and one worker
    init = next(kw for name, kw in engine.llm.calls if name == "init_weight_transfer_engine")["init_info"]
    assert (init["rank_offset"], init["world_size"], init["master_port"]) == (1, 2, info.master_port)

    plan = sync_plan(policy, "checkpoint")
    names = [name for name, _, _ in plan]
    # the checkpoint's names, which vLLM loaded the engine from (a tied head comes along, as on the default path)
    assert engine.tie_word_embeddings and set(names) - {"lm_head.weight"} == set(engine._shapes)
    assert any(".mlp.experts.0.gate_proj.weight" in n for n in names)  # per expert, as the default path sends
    updates = [kw["update_info"] for name, kw in engine.llm.calls if name == "update_weights"]
    for update in updates:
        assert update["names"] == names
        assert update["dtype_names"] == ["bfloat16"] * len(names)  # the engine's dtype, cast by the trainer
        assert update["shapes"] == [list(shape) for _, shape, _ in plan]
    for sent, model in zip(nccl.sent, (policy, moved)):  # what was broadcast: each sync's own weights
        state = dict(model.named_parameters())
        assert [n for n, _ in sent] == names
        name, tensor = sent[0]
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, state[name].detach().to(torch.bfloat16))
    assert not torch.equal(nccl.sent[0][0][1], nccl.sent[1][0][1])
    assert engine.num_syncs == 2
    engine.close()
    assert engine.llm is None and nccl.destroyed == 1


def test_failed_update_refuses_generate_until_a_sync_succeeds(nccl, checkpoint, policy):
    engine = build(checkpoint)
    engine.load_weights(policy)
    engine.llm.fail["update_weights"] = RuntimeError("receive buffer out of memory")
    with pytest.raises(EngineError, match="update_weights.*receive buffer out of memory.*refuses to generate"):
        engine.load_weights(policy)
    with pytest.raises(EngineError, match="partly undefined; sync again"):
        engine.generate([[1, 2]], max_new_tokens=1)
    engine.load_weights(policy)  # vLLM's worker ended its update session when it raised: a new round may run
    assert engine.generate([[1, 2]], max_new_tokens=1).completion_ids.tolist() == [[5]]
    assert engine.llm.rpc_names().count("init_weight_transfer_engine") == 1
    engine.close()


def test_failed_broadcast_leaves_the_engine_closed_to_syncs(nccl, checkpoint, policy, monkeypatch):
    from vllm.distributed.weight_transfer import nccl_engine

    engine = build(checkpoint)
    engine.load_weights(policy)

    def broken(iterator, **kwargs):
        next(iterator)
        raise RuntimeError("NCCL error: unhandled system error")

    monkeypatch.setattr(nccl_engine, "packed_nccl_broadcast_producer", broken)
    with pytest.raises(EngineError, match="trainer's broadcast.*close this VLLMEngine"):
        engine.load_weights(policy)
    calls = len(engine.llm.calls)
    with pytest.raises(EngineError, match="cannot run again.*build a new one"):
        engine.load_weights(policy)
    with pytest.raises(EngineError, match="partly undefined"):
        engine.generate([[1, 2]], max_new_tokens=1)
    assert len(engine.llm.calls) == calls  # nothing more reached the workers
    engine.close()
    assert "shutdown_weight_transfer_engine" not in engine_calls(nccl)  # a worker may still wait in NCCL


def engine_calls(nccl):
    return [name for llm in nccl.llms for name, _ in llm.calls]


def test_buckets_without_the_checked_plan_refused(nccl, checkpoint, policy):
    from pgzoo.rollout.sync import iter_sync_buckets

    engine = build(checkpoint)
    with pytest.raises(EngineError, match="needs the sync's plan.*load_weights"):
        engine.load_weight_buckets(iter_sync_buckets(policy))
    assert nccl.endpoints == []
    engine.close()
