"""Recording around model.generate, and replay under gradient checkpointing."""

from __future__ import annotations

import pytest
import torch

import pgzoo.routing as routing
from pgzoo.errors import RoutingError
from pgzoo.routing.tiny import build_tiny_family


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def left_padded_prompts(lengths, seed=0, vocab=100, pad=0):
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad, dtype=torch.long)
    am = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = torch.randint(3, vocab, (n,), generator=gen)
        am[i, width - n:] = 1
    return ids, am


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_generate_recording_equals_full_forward_recording(family):
    model = build_tiny_family(family, seed=0)
    prompt, prompt_mask = left_padded_prompts([4, 7, 2])
    n, new = 2, 6
    torch.manual_seed(0)
    with torch.no_grad(), routing.record(model) as rec:
        seqs = model.generate(prompt, attention_mask=prompt_mask, do_sample=True, max_new_tokens=new,
                              num_return_sequences=n, pad_token_id=0, eos_token_id=None)
    assert rec.num_forwards == new  # prefill + (new - 1) decode steps: the last token is never fed back
    assert seqs.shape == (3 * n, 7 + new)
    assert rec.routes.shape == (3 * n, 7 + new - 1, 3, 2)
    aligned = rec.aligned(seqs.shape[1])
    assert (aligned[:, -1] == routing.UNROUTED).all()
    full_mask = torch.cat([prompt_mask.repeat_interleave(n, 0), torch.ones(3 * n, new, dtype=torch.long)], 1)
    with torch.no_grad(), routing.record(model) as full:
        model(seqs, attention_mask=full_mask)
    real = full_mask.bool()
    real[:, -1] = False
    assert torch.equal(aligned[real], full.routes[real])
    # The recorded generate routes replay on the full sequences (the last position routes freely).
    with torch.no_grad(), routing.replay(model, aligned, check=True) as rp:
        model(seqs, attention_mask=full_mask)
    assert rp.layers_hit == 3


def test_generate_recording_with_tiny_policy_and_greedy():
    from pgzoo.models import build_tiny_moe

    model = build_tiny_moe(seed=0)
    prompt, mask = left_padded_prompts([5, 3], seed=1)
    with torch.no_grad(), routing.record(model) as rec:
        seqs = model.generate(prompt, attention_mask=mask, do_sample=False, max_new_tokens=4, pad_token_id=0,
                              eos_token_id=None)
    full_mask = torch.cat([mask, torch.ones(2, 4, dtype=torch.long)], 1)
    with torch.no_grad(), routing.record(model) as full:
        model(seqs, attention_mask=full_mask)
    real = full_mask.bool()[:, :-1]
    assert torch.equal(rec.routes[real], full.routes[:, :-1][real])
    assert len(rec.steps) == 4 and rec.steps[0].shape[1] == 5 and rec.steps[1].shape[1] == 1


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture()
def checkpointed_setup():
    model = build_tiny_family("qwen3_moe", seed=0)
    ids = torch.randint(3, 100, (3, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), routing.record(model) as rec:
        model(ids)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # routers move far enough that natural routing differs from the recorded one
        for layer in routing.find_moe_layers(model):
            w = layer.router.weight
            w.add_(torch.randn(w.shape, generator=gen) * 3 * w.std())
    model.train()
    return model, ids, rec.routes


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_recompute_replays_same_routes(checkpointed_setup, reentrant):
    model, ids, routes = checkpointed_setup
    model.zero_grad()
    with routing.replay(model, routes) as rp:
        model(ids).logits.square().mean().backward()
    reference = grads(model)
    assert float(routing.routing_drift(routes, rp.natural_routes)["drift"]) > 0.3

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:
        model.enable_input_require_grads()
    model.zero_grad()
    with routing.replay(model, routes) as rp:
        model(ids).logits.square().mean().backward()
    assert rp.recomputed == 3 and rp.num_forwards == 1  # each MoE layer recomputed once, not a new forward
    got = grads(model)
    assert got.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(got[name], reference[name], atol=1e-6, rtol=1e-5, msg=name)

    # Had the recomputation routed naturally, gradients would differ: the same check can fail.
    model.zero_grad()
    with pytest.raises(RoutingError, match="Call loss.backward\\(\\) inside"):
        with routing.replay(model, routes):
            loss = model(ids).logits.square().mean()
    # Backward after the context recomputes with natural routing: torch notices a different number of saved
    # tensors (expert loads changed), or, when the counts happen to agree, the gradients are wrong.
    try:
        loss.backward()
    except torch.utils.checkpoint.CheckpointError:
        pass
    else:
        wrong = grads(model)
        assert any(not torch.allclose(wrong[n], reference[n], atol=1e-6) for n in reference)
    model.gradient_checkpointing_disable()


def test_record_under_gradient_checkpointing_does_not_record_recomputation(checkpointed_setup):
    model, ids, _ = checkpointed_setup
    with torch.no_grad(), routing.record(model) as plain:
        model(ids)
    model.gradient_checkpointing_enable()
    with routing.record(model) as rec:
        model(ids).logits.square().mean().backward()
    model.gradient_checkpointing_disable()
    assert rec.num_forwards == 1 and torch.equal(rec.routes, plain.routes)
