"""Routing record/replay on the four supported MoE families: forced ids, gate weights, gradients, exactness,
dense layers between MoE layers, padding, and every error case."""

from __future__ import annotations

import copy

import pytest
import torch

import pgzoo.routing as routing
from pgzoo.errors import RoutingError
from pgzoo.routing.tiny import build_tiny_family


pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAMILIES = ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe"]


def renormalises(model) -> bool:
    """Reference rule, read from the configs' documentation: Mixtral always renormalises the top-k."""
    cfg = model.config
    return True if cfg.model_type == "mixtral" else bool(cfg.norm_topk_prob)


class Spy:
    """Independent observer: what each experts module receives, and each router's input and weight."""

    def __init__(self, model):
        self.layers = routing.find_moe_layers(model)
        self.ids, self.weights, self.router_in = {}, {}, {}
        self.handles = []
        for layer in self.layers:
            self.handles.append(layer.experts.register_forward_pre_hook(self._experts(layer.slot)))
            self.handles.append(layer.router.register_forward_pre_hook(self._router(layer.slot)))

    def _experts(self, slot):
        def hook(module, args):
            self.ids[slot], self.weights[slot] = args[1].detach().clone(), args[2].detach().clone()

        return hook

    def _router(self, slot):
        def hook(module, args):
            self.router_in[slot] = args[0].detach().reshape(-1, args[0].shape[-1]).clone()

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def perturb_routers(model, scale=3.0, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in routing.find_moe_layers(model):
            w = layer.router.weight
            w.add_(torch.randn(w.shape, generator=gen) * scale * w.std())


def inputs(batch=3, seq=11, seed=0, vocab=100):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq), generator=gen)


@pytest.fixture(params=FAMILIES)
def family_model(request):
    return build_tiny_family(request.param, seed=0)


def test_replay_forces_ids_weights_from_current_router_and_router_gets_gradient(family_model):
    model = family_model
    ids = inputs()
    with torch.no_grad(), routing.record(model) as rec:
        model(ids)
    routes = rec.routes
    assert routes.shape == (3, 11, 3, 2) and routes.dtype == torch.long
    perturb_routers(model)
    spy = Spy(model)
    model.zero_grad()
    with routing.replay(model, routes) as rp:
        out = model(ids).logits
        out.float().square().mean().backward()
    spy.remove()
    assert rp.layers_hit == 3
    # The perturbation really changed the natural routing, so forcing is observable.
    assert float(routing.routing_drift(routes, rp.natural_routes)["drift"]) > 0.3
    for layer in spy.layers:
        slot = layer.slot
        # The experts received exactly the recorded ids, in the recorded order.
        assert torch.equal(spy.ids[slot], routes[:, :, slot].reshape(-1, 2))
        # Gate weights = the current router's full-softmax probabilities at those ids (renormalised by family).
        logits = spy.router_in[slot].double() @ layer.router.weight.detach().double().T
        ref = torch.softmax(logits, -1).gather(-1, spy.ids[slot])
        if renormalises(model):
            ref = ref / ref.sum(-1, keepdim=True)
        torch.testing.assert_close(spy.weights[slot].double(), ref, atol=2e-6, rtol=1e-5)
        grad = layer.router.weight.grad
        assert grad is not None and float(grad.abs().sum()) > 0


def test_same_weights_replay_reproduces_logits_exactly(family_model):
    model = family_model
    ids = inputs(batch=4, seq=13, seed=3)
    with torch.no_grad():
        with routing.record(model) as rec:
            plain = model(ids).logits
        with routing.replay(model, rec.routes):
            replayed = model(ids).logits
    assert torch.equal(plain, replayed)


def test_grad_of_same_weights_replay_equals_plain_grad():
    model = build_tiny_family("qwen3_moe", seed=2)
    ids = inputs(seed=4)
    with torch.no_grad(), routing.record(model) as rec:
        model(ids)
    model.zero_grad()
    model(ids).logits.square().mean().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    with routing.replay(model, rec.routes):
        model(ids).logits.square().mean().backward()
    for n, p in model.named_parameters():
        if n in plain:
            assert torch.equal(p.grad, plain[n]), n


@pytest.mark.parametrize(
    "family, overrides, expected",
    [
        ("qwen3_moe", dict(num_hidden_layers=4, mlp_only_layers=[1]), [0, 2, 3]),
        ("qwen2_moe", dict(num_hidden_layers=4, decoder_sparse_step=2), [1, 3]),
    ],
)
def test_dense_layers_between_moe_layers(family, overrides, expected):
    model = build_tiny_family(family, seed=0, **overrides)
    assert [layer.layer_index for layer in routing.find_moe_layers(model)] == expected
    ids = inputs()
    with torch.no_grad(), routing.record(model) as rec:
        plain = model(ids).logits
    assert rec.routes.shape == (3, 11, len(expected), 2)
    spy = Spy(model)
    with torch.no_grad(), routing.replay(model, rec.routes) as rp:
        replayed = model(ids).logits
    spy.remove()
    assert torch.equal(plain, replayed) and rp.layers_hit == len(expected)
    for layer in spy.layers:
        assert torch.equal(spy.ids[layer.slot], rec.routes[:, :, layer.slot].reshape(-1, 2))


def test_qwen2_shared_expert_unchanged_under_replay():
    model = build_tiny_family("qwen2_moe", seed=0)
    ids = inputs()
    seen = []
    block = routing.find_moe_layers(model)[0].block
    handle = block.shared_expert.register_forward_hook(lambda m, a, o: seen.append(o.detach().clone()))
    with torch.no_grad(), routing.record(model) as rec:
        model(ids)
    perturb_routers(model)
    with torch.no_grad(), routing.replay(model, rec.routes):
        model(ids)
    handle.remove()
    # Layer 0's input does not depend on routing: the shared expert output is identical.
    assert len(seen) == 2 and torch.equal(seen[0], seen[1])


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_replays_each_rows_own_routes(side):
    """Routes recorded per unpadded sequence, laid out in a padded batch (-1 at pads), replay at the right places."""
    model = build_tiny_family("qwen3_moe", seed=0)
    lengths = [5, 9, 7]
    seqs = [inputs(1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    single = []
    with torch.no_grad():
        for s in seqs:
            with routing.record(model) as rec:
                model(s[None])
            single.append(rec.routes[0])
    perturb_routers(model)
    s_max = max(lengths)
    ids = torch.zeros(3, s_max, dtype=torch.long)
    am = torch.zeros(3, s_max, dtype=torch.long)
    routes = torch.full((3, s_max, 3, 2), routing.UNROUTED, dtype=torch.long)
    spans = []
    for i, (s, r) in enumerate(zip(seqs, single)):
        span = slice(s_max - len(s), s_max) if side == "left" else slice(0, len(s))
        ids[i, span], am[i, span], routes[i, span] = s, 1, r
        spans.append(span)
    spy = Spy(model)
    with torch.no_grad():
        with routing.replay(model, routes):
            batched = model(ids, attention_mask=am).logits
        forced = {k: v.reshape(3, s_max, 2) for k, v in spy.ids.items()}
        for i, s in enumerate(seqs):
            with routing.replay(model, single[i][None]):
                alone = model(s[None]).logits[0]
            torch.testing.assert_close(batched[i, spans[i]], alone, atol=2e-5, rtol=1e-5)
            for slot in range(3):
                assert torch.equal(forced[slot][i, spans[i]], single[i][:, slot])
    spy.remove()


def test_unrouted_slots_let_the_router_choose():
    model = build_tiny_family("mixtral", seed=0)
    ids = inputs()
    with torch.no_grad(), routing.record(model) as rec:
        model(ids)
    perturb_routers(model)
    routes = rec.routes.clone()
    routes[:, -2:] = routing.UNROUTED
    spy = Spy(model)
    with torch.no_grad(), routing.replay(model, routes) as rp:
        model(ids)
    spy.remove()
    for slot in range(3):
        got = spy.ids[slot].reshape(3, 11, 2)
        assert torch.equal(got[:, :-2], rec.routes[:, :-2, slot])
        assert torch.equal(got[:, -2:], rp.natural_routes[:, -2:, slot])


def test_record_works_on_inner_model():
    model = build_tiny_family("olmoe", seed=0)
    ids = inputs()
    with torch.no_grad(), routing.record(model.model) as inner:
        model(ids)
    with torch.no_grad(), routing.record(model) as outer:
        model.model(ids)
    assert torch.equal(inner.routes, outer.routes)


# -- errors ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen():
    model = build_tiny_family("qwen3_moe", seed=0)
    ids = inputs()
    with torch.no_grad(), routing.record(model) as rec:
        model(ids)
    return model, ids, rec.routes


def test_unknown_family_and_dense_model_raise_naming_the_class():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GptOssConfig(vocab_size=50, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, head_dim=16)
    with pytest.raises(RoutingError, match="GptOssForCausalLM"):
        routing.record(transformers.AutoModelForCausalLM.from_config(cfg))
    from pgzoo.models import build_tiny_dense

    with pytest.raises(RoutingError, match="Qwen3ForCausalLM has no MoE layers"):
        routing.replay(build_tiny_dense(), torch.zeros(1, 1, 1, 2, dtype=torch.long))
    with pytest.raises(RoutingError, match="torch.nn.Module"):
        routing.record("not a model")


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda r: r.float(), "integer expert ids"),
        (lambda r: r[0], r"\[B, S, L_moe, k\].*unsqueeze"),
        (lambda r: r[:, :, :2], "hold 2 MoE layers but the model has 3"),
        (lambda r: r[..., :1], "top-1 ids but the model routes top-2"),
        (lambda r: torch.where(r == 3, 8, r), r"outside \[0, 8\)"),
        (lambda r: torch.where(r == 3, -2, r), r"outside \[0, 8\)"),
        (lambda r: torch.zeros_like(r), "degenerate.*repeat one expert"),
        (lambda r: torch.full_like(r, -1), "all -1"),
        (lambda r: torch.cat([r[..., :1], torch.full_like(r[..., 1:], -1)], -1), "mix -1"),
        (lambda r: r[:, :0], "empty"),
    ],
)
def test_bad_routes_raise(qwen, make, match):
    model, _, routes = qwen
    with pytest.raises(RoutingError, match=match):
        routing.replay(model, make(routes))


def test_constant_top1_routes_are_degenerate():
    model = build_tiny_family("qwen3_moe", seed=0, num_experts_per_tok=1)
    with pytest.raises(RoutingError, match="every slot routes to expert 0"):
        routing.replay(model, torch.zeros(2, 8, 3, 1, dtype=torch.long))
    # Few slots on one expert are legitimate.
    with torch.no_grad(), routing.replay(model, torch.zeros(1, 1, 3, 1, dtype=torch.long)) as rp:
        model(torch.tensor([[5]]))
    assert rp.layers_hit == 3


@pytest.mark.parametrize("ids_shape", [(3, 12), (2, 11), (11, 3)])
def test_shape_mismatch_with_input_raises(qwen, ids_shape):
    model, _, routes = qwen
    with pytest.raises(RoutingError, match=r"routes are for \[B, S\] = \[3, 11\]"), torch.no_grad():
        with routing.replay(model, routes):
            model(torch.randint(3, 100, ids_shape))


def test_forward_on_another_object_raises(qwen):
    model, ids, routes = qwen
    other = copy.deepcopy(model)
    with pytest.raises(RoutingError, match="no forward inside the context reached"), torch.no_grad():
        with routing.replay(model, routes):
            other(ids)


def test_forward_hitting_fewer_layers_raises(qwen):
    model, ids, routes = qwen
    block = routing.find_moe_layers(model)[1].block
    block.forward = lambda hidden: hidden * 0  # a kernel that bypasses the router
    try:
        with pytest.raises(RoutingError, match="hit 2 of the 3 MoE layers.*missed decoder layers \\[1\\]"):
            with torch.no_grad(), routing.replay(model, routes):
                model(ids)
    finally:
        del block.forward
    with torch.no_grad(), routing.replay(model, routes) as rp:  # and the hooks were removed after the error
        model(ids)
    assert rp.layers_hit == 3 and not model.model.layers[0].mlp.gate._forward_hooks


def test_record_without_forward_raises(qwen):
    model, _, _ = qwen
    with routing.record(model) as rec:
        pass
    with pytest.raises(RoutingError, match="no forward"):
        rec.routes


def test_record_of_forwards_with_different_batch_sizes_raises(qwen):
    model, _, _ = qwen
    with torch.no_grad(), routing.record(model) as rec:
        model(inputs(2, 5))
        model(inputs(3, 5))
    assert [s.shape[0] for s in rec.steps] == [2, 3]
    with pytest.raises(RoutingError, match="different batch sizes"):
        rec.routes


def test_aligned_pads_with_unrouted(qwen):
    model, ids, routes = qwen
    with torch.no_grad(), routing.record(model) as rec:
        model(ids)
    padded = rec.aligned(14)
    assert padded.shape == (3, 14, 3, 2) and torch.equal(padded[:, :11], routes)
    assert (padded[:, 11:] == routing.UNROUTED).all()
    with pytest.raises(RoutingError, match="shorter"):
        rec.aligned(5)


# -- drift ----------------------------------------------------------------------------------------------------


def naive_drift(a, b, mask):
    """Loop reference: per (row, pos, layer) compare expert sets."""
    B, S, L, k = a.shape
    diff = [0] * L
    valid = [0] * L
    overlap = 0.0
    tokens = tokens_differ = 0
    for i in range(B):
        for t in range(S):
            if mask is not None and not mask[i, t]:
                continue
            any_valid = any_diff = False
            for layer in range(L):
                x, y = a[i, t, layer].tolist(), b[i, t, layer].tolist()
                if -1 in x or -1 in y:
                    continue
                any_valid = True
                valid[layer] += 1
                d = set(x) != set(y)
                diff[layer] += d
                any_diff |= d
                overlap += len(set(x) & set(y)) / k
            tokens += any_valid
            tokens_differ += any_diff
    n = sum(valid)
    return {
        "drift": sum(diff) / max(n, 1),
        "drift_any_layer": tokens_differ / max(tokens, 1),
        "expert_overlap": overlap / n if n else 1.0,
        **{f"drift_layer_{i}": diff[i] / max(valid[i], 1) for i in range(L)},
    }


@pytest.mark.parametrize("use_mask", [False, True])
def test_routing_drift_matches_naive_reference(use_mask):
    gen = torch.Generator().manual_seed(0)
    a = torch.stack([torch.randperm(6, generator=gen)[:3] for _ in range(4 * 7 * 2)]).reshape(4, 7, 2, 3)
    b = a.clone()
    flip = torch.rand(4, 7, 2, generator=gen) < 0.4
    b[flip] = torch.stack([torch.randperm(6, generator=gen)[:3] for _ in range(int(flip.sum()))])
    b[0, 0] = b[0, 0].flip(-1)  # same set, other order: not drift
    a[1, 2, 0] = -1  # unrouted slot: excluded
    mask = (torch.rand(4, 7, generator=gen) < 0.7) if use_mask else None
    got = routing.routing_drift(a, b, mask)
    ref = naive_drift(a, b, mask)
    assert set(ref) <= set(got)
    for key, value in ref.items():
        assert abs(float(got[key]) - value) < 1e-6, key
    assert 0 < float(got["drift"]) < 1


def test_routing_drift_errors_and_empty():
    a = torch.zeros(2, 3, 2, 2, dtype=torch.long)
    with pytest.raises(RoutingError, match="shapes differ"):
        routing.routing_drift(a, a[:, :2])
    with pytest.raises(RoutingError, match="mask shape"):
        routing.routing_drift(a, a, torch.ones(2, 2))
    out = routing.routing_drift(a, a, torch.zeros(2, 3))
    assert float(out["drift"]) == 0 and float(out["num_slots"]) == 0 and float(out["expert_overlap"]) == 1


def test_record_of_independent_forwards_refuses_to_join_them(qwen):
    model, ids, _ = qwen
    with torch.no_grad(), routing.record(model) as rec:
        model(ids)
        model(ids)
    assert len(rec.steps) == 2
    with pytest.raises(RoutingError, match="KV-cached decode steps"):
        rec.routes


def test_generate_without_cache_is_refused(qwen):
    model, ids, _ = qwen
    with torch.no_grad(), routing.record(model) as rec:
        model.generate(ids, max_new_tokens=3, do_sample=False, use_cache=False, pad_token_id=0, eos_token_id=None)
    with pytest.raises(RoutingError, match="use_cache=False"):
        rec.routes


def test_replay_context_survives_a_caught_error(qwen):
    model, ids, routes = qwen
    with torch.no_grad(), routing.replay(model, routes) as rp:
        with pytest.raises(RoutingError, match="routes are for"):
            model(ids[:, :5])
        model(ids)  # a complete forward afterwards is checked on its own
    assert rp.num_forwards == 1 and rp.layers_hit == 3


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_replay_is_exact(family):
    model = build_tiny_family(family, seed=0, dtype=torch.bfloat16)
    ids = inputs()
    with torch.no_grad():
        with routing.record(model) as rec:
            plain = model(ids).logits
        with routing.replay(model, rec.routes):
            replayed = model(ids).logits
    assert plain.dtype == torch.bfloat16 and torch.equal(plain, replayed)


def test_peft_lora_wrapper_records_and_replays():
    peft = pytest.importorskip("peft")
    model = build_tiny_family("qwen3_moe", seed=0)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ids = inputs()
    with torch.no_grad(), routing.record(wrapped) as rec:
        plain = wrapped(input_ids=ids).logits
    perturb_routers(model)
    spy = Spy(wrapped)
    with routing.replay(wrapped, rec.routes) as rp:
        wrapped(input_ids=ids).logits.square().mean().backward()
    spy.remove()
    assert rp.layers_hit == 3 and plain.shape[:2] == (3, 11)
    for layer in spy.layers:
        assert torch.equal(spy.ids[layer.slot], rec.routes[:, :, layer.slot].reshape(-1, 2))
    lora_grads = [p.grad for n, p in wrapped.named_parameters() if "lora_" in n and p.grad is not None]
    assert lora_grads and any(float(g.abs().sum()) > 0 for g in lora_grads)


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_replay_gradient_equals_naive_forced_block(family):
    """Reference: each MoE block rewritten by hand (router softmax -> gather at forced ids -> renormalise ->
    the same experts module), no pgzoo hooks. Logits and every gradient, routers included, must match."""
    model = build_tiny_family(family, seed=0)
    ids = inputs(seed=8)
    with torch.no_grad(), routing.record(model) as rec:
        model(ids)
    perturb_routers(model)
    model.zero_grad()
    with routing.replay(model, rec.routes):
        out = model(ids).logits
        out.square().mean().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    layers = routing.find_moe_layers(model)
    originals = {}
    for layer in layers:
        forced = rec.routes[:, :, layer.slot].reshape(-1, 2)
        block, router, experts = layer.block, layer.router, layer.experts

        def naive(hidden, block=block, router=router, experts=experts, forced=forced):
            b, s, h = hidden.shape
            flat = hidden.reshape(-1, h)
            probs = torch.softmax(flat.float() @ router.weight.float().T, dim=-1)
            w = torch.stack([probs[t, forced[t]] for t in range(flat.shape[0])])
            if renormalises(model):
                w = w / w.sum(-1, keepdim=True)
            y = experts(flat, forced, w.to(flat.dtype))
            if family == "qwen2_moe":
                y = y + torch.sigmoid(block.shared_expert_gate(flat)) * block.shared_expert(flat)
            return y.reshape(b, s, h)

        originals[layer.slot] = block.forward
        block.forward = naive
    try:
        model.zero_grad()
        ref_out = model(ids).logits
        ref_out.square().mean().backward()
    finally:
        for layer in layers:
            del layer.block.forward
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    ref = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == ref.keys()
    for layer in layers:
        name = next(n for n, p in model.named_parameters() if p is layer.router.weight)
        assert float(ref[name].abs().sum()) > 0
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=1e-6, rtol=1e-4, msg=name)


def test_hooks_are_removed_when_the_body_raises(qwen):
    model, ids, routes = qwen
    router = routing.find_moe_layers(model)[0].router
    for ctx in (routing.record(model), routing.replay(model, routes)):
        with pytest.raises(KeyError):
            with ctx:
                raise KeyError("boom")
        assert not router._forward_hooks and not model._forward_pre_hooks and not model._forward_hooks
