"""RoutingReplay: the R2 / R3 / off protocol trainers drive, row bookkeeping, metrics and errors."""

from __future__ import annotations

import pytest
import torch

import pgzoo.routing as routing
from pgzoo.errors import ConfigError, RoutingError
from pgzoo.routing import RoutingReplay
from pgzoo.routing.tiny import build_tiny_family

from test_routing import perturb_routers


pytestmark = pytest.mark.usefixtures("one_torch_thread")

N, S, L, K = 6, 9, 3, 2


class ExpertSpy:
    """Independent observer: the ids each experts module receives, and the top-k the router's own weights would
    pick on the hidden states it received (computed here, from scratch)."""

    def __init__(self, model):
        self.ids, self.own = {}, {}
        self.handles = []
        for layer in routing.find_moe_layers(model):
            self.handles.append(layer.experts.register_forward_pre_hook(
                lambda m, a, slot=layer.slot: self.ids.__setitem__(slot, a[1].detach().clone())))
            self.handles.append(layer.router.register_forward_pre_hook(
                lambda m, a, slot=layer.slot: self.own.__setitem__(
                    slot, (a[0].detach() @ m.weight.detach().T).topk(m.top_k, dim=-1).indices)))

    def routes(self, b, s):
        return torch.stack([self.ids[i].reshape(b, s, -1) for i in sorted(self.ids)], dim=2)

    def own_routes(self, b, s):
        return torch.stack([self.own[i].reshape(b, s, -1) for i in sorted(self.own)], dim=2)

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.fixture()
def batch():
    model = build_tiny_family("qwen3_moe", seed=0)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (N, S), generator=gen)
    am = torch.ones(N, S, dtype=torch.long)
    am[0, :3] = 0  # a left-padded row
    am[4, -2:] = 0  # a right-padded row
    return model, ids, am


def test_r2_records_in_chunks_and_replays_each_rows_routes_in_any_order(batch):
    model, ids, am = batch
    with torch.no_grad(), routing.record(model) as ref:
        model(ids, attention_mask=am)
    rr = RoutingReplay("R2")
    rr.start_batch()
    for rows in (slice(0, 4), [4, 5]):  # old pass in chunks, one a slice and one a list
        with torch.no_grad(), rr.old_pass(model, rows=rows, mask=am[rows]) as rec:
            model(ids[rows], attention_mask=am[rows])
        assert isinstance(rec, routing.Recording)
    assert torch.equal(rr.routes.long(), ref.routes) and rr.routes.dtype == torch.int16
    perturb_routers(model)
    spy = ExpertSpy(model)
    seen_rows, own = [], []
    for rows in (torch.tensor([5, 1, 3]), [0, 4, 2]):
        with rr.update_pass(model, rows=rows, mask=am[rows]) as rp:
            model(ids[rows], attention_mask=am[rows]).logits.square().mean().backward()
        assert isinstance(rp, routing.Replay)
        assert torch.equal(spy.routes(3, S), ref.routes[torch.as_tensor(rows)])
        seen_rows += list(torch.as_tensor(rows).tolist())
        own.append(spy.own_routes(3, S))
    spy.remove()
    m = rr.metrics()
    assert float(m["routing/layers_hit"]) == L and float(m["routing/num_moe_layers"]) == L
    # drift_update: θ's router (on the replayed forward's hidden states) vs the replayed θ_old routes.
    expected = routing.routing_drift(ref.routes[seen_rows], torch.cat(own), am[seen_rows])
    assert float(expected["drift"]) > 0.3
    torch.testing.assert_close(m["routing/drift_update"], expected["drift"])
    torch.testing.assert_close(m["routing/drift_update_any_layer"], expected["drift_any_layer"])
    torch.testing.assert_close(m["routing/expert_overlap_update"], expected["expert_overlap"])
    for i in range(L):
        torch.testing.assert_close(m[f"routing/drift_update_layer_{i}"], expected[f"drift_layer_{i}"])
    assert not any(k.startswith("routing/drift_rollout") for k in m)  # no rollout routes given


def test_r2_same_weights_is_exact_and_has_zero_drift(batch):
    model, ids, am = batch
    rr = RoutingReplay("r2")
    rr.start_batch()
    with torch.no_grad(), rr.old_pass(model, mask=am):
        old = model(ids, attention_mask=am).logits
    with torch.no_grad(), rr.update_pass(model, rows=range(N), mask=am):
        new = model(ids, attention_mask=am).logits
    assert torch.equal(old, new)
    assert float(rr.metrics()["routing/drift_update"]) == 0.0


def test_routes_argument_equals_rows_lookup(batch):
    model, ids, am = batch
    rr = RoutingReplay("R2")
    rr.start_batch()
    with torch.no_grad(), rr.old_pass(model):
        model(ids, attention_mask=am)
    perturb_routers(model)
    rows = [3, 0]
    with torch.no_grad():
        with rr.update_pass(model, rows=rows):
            a = model(ids[rows], attention_mask=am[rows]).logits
        with rr.update_pass(model, routes=rr.routes_for(rows)):
            b = model(ids[rows], attention_mask=am[rows]).logits
    assert torch.equal(a, b)


def test_r3_replays_rollout_routes_and_measures_train_rollout_drift(batch):
    model, ids, am = batch
    rollout_engine = build_tiny_family("qwen3_moe", seed=0)
    perturb_routers(rollout_engine, scale=0.5, seed=7)  # an engine whose routing differs from the trainer's
    with torch.no_grad(), routing.record(rollout_engine) as ro:
        rollout_engine(ids, attention_mask=am)
    rollout_routes = ro.aligned(S + 1)[:, :S].clone()
    rollout_routes[0, :3] = routing.UNROUTED  # engines mark padding as unrouted
    with torch.no_grad(), routing.record(model) as train:
        model(ids, attention_mask=am)
    rr = RoutingReplay("R3")
    assert rr.needs_rollout_routes
    rr.start_batch(rollout_routes)
    spy = ExpertSpy(model)
    own = []
    for rows in (slice(0, 3), slice(3, 6)):
        with torch.no_grad(), rr.old_pass(model, rows=rows, mask=am[rows]):
            model(ids[rows], attention_mask=am[rows])
        own.append(spy.own_routes(3, S))
        forced = spy.routes(3, S)
        want = rollout_routes[rows]
        routed = want[..., 0] != routing.UNROUTED
        assert torch.equal(forced[routed], want[routed])
    with rr.update_pass(model, rows=[5, 2], mask=am[[5, 2]]):
        model(ids[[5, 2]], attention_mask=am[[5, 2]]).logits.mean().backward()
    assert torch.equal(spy.routes(2, S), rollout_routes[[5, 2]])
    spy.remove()
    m = rr.metrics()
    # Under R3 the training router is compared layer by layer on the replayed forward's hidden states.
    expected = routing.routing_drift(rollout_routes, torch.cat(own), am)
    assert 0 < float(expected["drift"]) < 1
    torch.testing.assert_close(m["routing/drift_rollout"], expected["drift"])
    # Layer 0 sees the same input either way: equal to the free-running training engine's drift there.
    free = routing.routing_drift(rollout_routes, train.routes, am)
    torch.testing.assert_close(m["routing/drift_rollout_layer_0"], free["drift_layer_0"])
    assert "routing/drift_update" in m and float(m["routing/layers_hit"]) == L


def test_r2_with_rollout_routes_reports_rollout_drift_too(batch):
    model, ids, am = batch
    with torch.no_grad(), routing.record(model) as same:
        model(ids, attention_mask=am)
    rr = RoutingReplay("R2")
    rr.start_batch(same.routes)
    with torch.no_grad(), rr.old_pass(model, mask=am):
        model(ids, attention_mask=am)
    m = rr.metrics()
    assert float(m["routing/drift_rollout"]) == 0.0 and float(m["routing/expert_overlap_rollout"]) == 1.0


def test_off_mode_is_a_no_op(batch):
    model, ids, am = batch
    rr = RoutingReplay(None)
    assert not rr.enabled and not rr.needs_rollout_routes
    rr.start_batch()
    with torch.no_grad():
        plain = model(ids).logits
        with rr.old_pass(model) as ctx:
            assert ctx is None
            model(ids)
        with rr.update_pass(model, rows=[0]) as ctx:
            assert ctx is None
            same = model(ids).logits
    assert torch.equal(plain, same) and rr.metrics() == {}
    assert not routing.find_moe_layers(model)[0].router._forward_hooks


@pytest.mark.parametrize("mode, want", [("R2", "R2"), (" r3 ", "R3"), (None, None), ("none", None), ("off", None)])
def test_parse_mode(mode, want):
    assert routing.parse_mode(mode) == want


def test_bad_modes_and_missing_routes_raise(batch):
    model, ids, am = batch
    with pytest.raises(ConfigError, match="'R4'"):
        RoutingReplay("R4")
    with pytest.raises(ConfigError, match="return_routes=True"):
        RoutingReplay("R3").start_batch()
    with pytest.raises(RoutingError, match=r"\[N, S, L_moe, k\]"):
        RoutingReplay("R3").start_batch(torch.zeros(2, 3, 4))
    rr = RoutingReplay("R2")
    rr.start_batch()
    with pytest.raises(RoutingError, match="no routes stored"):
        rr.routes_for([0])
    with torch.no_grad(), rr.old_pass(model, rows=[0, 1, 2]):
        model(ids[:3])
    with pytest.raises(RoutingError, match=r"rows \[4\] have no routes"):
        with rr.update_pass(model, rows=[1, 4]):
            pass
    with pytest.raises(RoutingError, match=r"rows \[7\] have no routes"):
        rr.routes_for([7])
    r3 = RoutingReplay("R3")
    r3.start_batch(torch.zeros(2, S, L, K, dtype=torch.long))
    with pytest.raises(RoutingError, match=r"rows \[5\] are outside the batch's 2 rows"):
        r3.routes_for([0, 5])
    with pytest.raises(RoutingError, match="disagree on"), torch.no_grad():
        with rr.old_pass(model, rows=[3]):
            model(ids[3:4, :5])
    with pytest.raises(RoutingError, match="name 2 rows but the forward held 1"), torch.no_grad():
        with rr.old_pass(model, rows=[4, 5]):
            model(ids[4:5])
    rr.start_batch()  # a new batch forgets the old routes
    assert rr.routes is None and rr.metrics() == {}


def test_r3_with_transformers_engine_routes_same_precision_has_no_drift():
    rollout = pytest.importorskip("pgzoo.rollout")
    from pgzoo.models import build_tiny_moe

    policy = build_tiny_moe(seed=0)
    engine = rollout.TransformersEngine(policy, dtype="float32")
    ro = engine.generate([[5, 6, 7], [8, 9]], n=2, max_new_tokens=5, temperature=1.0, seed=0, return_routes=True)
    ids = torch.cat([ro.prompt_ids, ro.completion_ids], 1)
    am = torch.cat([ro.prompt_mask, ro.completion_mask], 1).long()
    rr = RoutingReplay("R3")
    rr.start_batch(ro.routes)
    with torch.no_grad(), rr.old_pass(policy, mask=am.bool()):
        policy(ids, attention_mask=am)
    m = rr.metrics()
    assert float(m["routing/layers_hit"]) == 4
    assert float(m["routing/drift_rollout"]) == 0.0
    engine.close()
