"""The training–inference mismatch knobs of the transformers engine, each measured against the float32 engine:
bf16 rollouts, FP8 rollouts and an MoE router computed in lower precision (``router_dtype``) all give a larger mean
|log μ − log π| than float32, which stays at rounding level (≤ 1e-5); the low-precision router sends tokens to other
experts; vLLM rejects ``rollout.router_dtype``."""

from __future__ import annotations

import pytest
import torch

from pgzoo.errors import ConfigError, EngineError
from pgzoo.models.tiny import TINY_MOE_SHAPES, build_tiny_dense, build_tiny_moe, build_tokenizer, moe_shape
from pgzoo.recipes import recipe_from_dict
from pgzoo.rollout import TransformersEngine, check_sync
from pgzoo.routing import record

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = [[1, 20 + i, 21 + i, 22, 23 + 2 * i, 24] for i in range(8)]


@pytest.fixture(scope="module")
def vocab():
    return len(build_tokenizer())


@pytest.fixture(scope="module")
def routed(vocab):
    return build_tiny_moe(vocab, seed=0, shape="routed-32x4")


def _gap(engine, policy) -> float:
    return check_sync(engine, policy, PROMPTS, max_new_tokens=16, seed=1).mean_abs_diff


def test_routed_shape_has_32_experts_top4_and_unknown_shapes_fail(routed):
    cfg = routed.config
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == (32, 4, 32)
    assert moe_shape(None) == {} and moe_shape("default") == {} and "routed-32x4" in TINY_MOE_SHAPES
    with pytest.raises(ConfigError, match="routed-32x4"):
        moe_shape("routed-64x8")


@pytest.mark.parametrize("knob", [dict(dtype="bfloat16"), dict(dtype="bfloat16", fp8=True), dict(fp8=True),
                                  dict(router_dtype="bfloat16"), dict(router_dtype="float16")])
def test_each_knob_gives_a_larger_gap_than_float32(routed, knob):
    fp32 = _gap(TransformersEngine(routed), routed)
    assert fp32 <= 1e-5
    gap = _gap(TransformersEngine(routed, **knob), routed)
    assert gap > 10 * max(fp32, 1e-7), (knob, gap, fp32)
    assert gap < 0.5  # a mismatch, not another policy


def test_router_float32_is_exact_and_router_bf16_changes_routes(routed):
    assert _gap(TransformersEngine(routed, router_dtype="float32"), routed) <= 1e-5
    ids = torch.tensor([p + [30, 31, 32, 33] for p in PROMPTS])
    routes = {}
    for name, kw in (("fp32", {}), ("bf16", dict(router_dtype="bfloat16"))):
        eng = TransformersEngine(routed, **kw)
        with record(eng.model) as rec:
            eng.model(input_ids=ids)
        routes[name] = rec.routes.sort(-1).values
    with record(routed) as rec:
        routed(input_ids=ids)
    assert torch.equal(routes["fp32"], rec.routes.sort(-1).values)  # the hook is the only difference
    flipped = (routes["bf16"] != routes["fp32"]).any(-1).float().mean()
    assert 0 < flipped < 0.5, flipped  # some tokens, not most, go to another expert set


def test_router_dtype_errors(vocab):
    with pytest.raises(EngineError, match="router_dtype='int8'"):
        TransformersEngine(build_tiny_moe(vocab, seed=0), router_dtype="int8")
    with pytest.raises(EngineError, match="needs an MoE model"):
        TransformersEngine(build_tiny_dense(vocab, seed=0), router_dtype="bfloat16")


def test_recipe_router_dtype_only_with_the_transformers_engine():
    base = {"rollout": {"engine": "transformers", "router_dtype": "bfloat16"}}
    r = recipe_from_dict(base)
    assert r.rollout.router_dtype == "bfloat16" and "router bfloat16" in r.plan()
    with pytest.raises(ConfigError, match="rollout.router_dtype=bfloat16: rollout.engine=vllm does not declare a separate dtype"):
        recipe_from_dict({"rollout": {"engine": "vllm", "router_dtype": "bfloat16"}})
    with pytest.raises(ConfigError, match="rollout.router_dtype"):
        recipe_from_dict({"rollout": {"engine": "transformers", "router_dtype": "int8"}})
