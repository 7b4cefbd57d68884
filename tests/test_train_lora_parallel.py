"""LoRA under data parallelism: two gloo processes under Lightning's DDP and FSDP2 strategies (FSDP2 shards a model
whose base parameters are frozen and only the adapters train) end one LoRA step with the adapters and effective
weights of one process holding the whole batch (max |Δ| <= 1e-5 in float32), with and without R2 replay."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
sys.path.insert(0, str(Path(__file__).parent))
import _dp_worker as W  # noqa: E402
import _lora_dp_worker as LW  # noqa: E402
from test_data_parallel import run_ranks  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
WORKER = Path(__file__).parent / "_lora_dp_worker.py"


def single_process(objective: str, replay: str | None):
    m = LW.module(objective, replay)
    init = LW.snapshot(m.policy)
    metrics = m.update(W.batch())
    return init, LW.snapshot(m.policy), metrics


@pytest.fixture(scope="module", params=["ddp", "fsdp"])
def two_rank_states(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"lora-{request.param}")
    run_ranks([str(WORKER), request.param, str(out)])
    return request.param, out


@pytest.mark.slow
@pytest.mark.parametrize("objective,replay", LW.CASES)
def test_a_lora_step_on_two_ranks_is_the_single_process_step(two_rank_states, objective, replay):
    strategy, out = two_rank_states
    got = torch.load(out / f"{strategy}-{objective}-{replay}.pt", weights_only=False)
    init, single, metrics = single_process(objective, replay)
    for part in ("adapters", "effective"):
        assert set(got[part]) == set(single[part]) and single[part], part
        worst = max(float((got[part][k].float() - single[part][k].float()).abs().max()) for k in single[part])
        assert worst <= 1e-5, f"{strategy} {objective} {replay} {part}: max |Δ| = {worst:.3g}"
    # the step moved the adapters (A and B), and only the weights they adapt
    moved = {k for k in single["adapters"] if not torch.equal(single["adapters"][k], init["adapters"][k])}
    assert any("lora_A" in k for k in moved) and any("lora_B" in k for k in moved)
    changed = {k for k in single["effective"] if not torch.equal(single["effective"][k], init["effective"][k])}
    assert changed and all(any(t in k for t in ("q_proj", "v_proj", "o_proj", "experts")) for k in changed)
    for key in ("loss", "grad_norm"):
        assert got["metrics"][key] == pytest.approx(metrics[key], rel=1e-5, abs=1e-6), key


@pytest.mark.slow
def test_a_two_rank_lora_checkpoint_holds_the_adapter_and_the_merged_model(two_rank_states):
    import transformers
    from safetensors.torch import load_file

    strategy, out = two_rank_states
    got = torch.load(out / f"{strategy}-minirl-None.pt", weights_only=False)
    ckpt = out / f"ckpt-{strategy}"
    assert (ckpt / "MANIFEST.json").is_file() and (ckpt / "adapter" / "adapter_config.json").is_file()
    assert (ckpt / "optimizer").is_dir() == (strategy == "fsdp")  # FSDP: the sharded optimizer state
    merged = transformers.AutoModelForCausalLM.from_pretrained(ckpt).state_dict()
    assert set(merged) == set(got["effective"])
    for k, v in got["effective"].items():
        torch.testing.assert_close(merged[k], v, atol=0, rtol=0)
    adapter = load_file(ckpt / "adapter" / "adapter_model.safetensors")
    assert len(adapter) == len(got["adapters"])
    for k, v in got["adapters"].items():
        torch.testing.assert_close(adapter[k.replace(".default", "")], v, atol=0, rtol=0)
