"""The library on a CUDA device (skipped without one; `benchmarks/gpu_check.py` runs the `cuda` subset): objectives,
training-inference correction, logprobs and routing replay give on the GPU what they give on the CPU, and the loop's
update runs with every tensor on the GPU."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _batch(device, B=6, T=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, T, generator=g) > 0.2
    mask[-1] = False  # a fully masked row
    lp = -torch.rand(B, T, generator=g) * 3
    old = lp + 0.1 * torch.randn(B, T, generator=g)
    mu = lp + 0.2 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    return {k: v.to(device) for k, v in dict(lp=lp, old=old, mu=mu, mask=mask, adv=adv).items()}


@pytest.mark.parametrize("name", ["minirl", "dapo", "grpo", "gspo", "cispo"])
def test_objectives_match_cpu(name):
    import pgzoo

    out = {}
    for device in ("cpu", "cuda"):
        b = _batch(device)
        lp = b["lp"].clone().requires_grad_(True)
        batch = pgzoo.TokenBatch(logprobs=lp, mask=b["mask"], advantages=b["adv"], old_logprobs=b["old"],
                                 rollout_logprobs=b["mu"], ref_logprobs=b["old"], max_tokens=9)
        res = pgzoo.get(name)(batch)
        res.loss.backward()
        assert res.loss.device.type == device
        out[device] = (res.loss.detach().cpu(), lp.grad.cpu())
    torch.testing.assert_close(out["cuda"][0], out["cpu"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["cuda"][1], out["cpu"][1], rtol=1e-5, atol=1e-6)


def test_correction_on_cuda():
    import pgzoo

    b = _batch("cuda")
    lp = b["lp"].clone().requires_grad_(True)
    batch = pgzoo.TokenBatch(logprobs=lp, mask=b["mask"], advantages=b["adv"], old_logprobs=b["old"],
                             rollout_logprobs=b["mu"])
    res = pgzoo.get("grpo", correction={"level": "token", "mode": "mask", "low": 0.5, "high": 5.0})(batch)
    res.loss.backward()
    assert torch.isfinite(lp.grad).all() and lp.grad.device.type == "cuda"


def test_logprobs_and_routing_replay_on_cuda():
    from pgzoo.models.logprobs import completion_logprobs
    from pgzoo.models import build_tiny_moe
    from pgzoo.routing import record, replay

    model = build_tiny_moe(vocab_size=100, seed=0).cuda()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(4, 90, (3, 5), generator=g).cuda()
    comp = torch.randint(4, 90, (3, 4), generator=g).cuda()
    pm, cm = torch.ones_like(prompt, dtype=torch.bool), torch.ones_like(comp, dtype=torch.bool)
    cpu = completion_logprobs(model.cpu(), prompt.cpu(), pm.cpu(), comp.cpu(), cm.cpu()).logprobs
    model.cuda()
    ids = torch.cat([prompt, comp], 1)
    with record(model) as rec:
        plain = completion_logprobs(model, prompt, pm, comp, cm).logprobs
    torch.testing.assert_close(plain.cpu(), cpu, rtol=1e-4, atol=1e-4)
    with replay(model, rec.routes.to(ids.device)) as rp:
        forced = completion_logprobs(model, prompt, pm, comp, cm).logprobs
    assert rp.layers_hit >= 1
    torch.testing.assert_close(forced, plain)


def test_update_runs_on_cuda():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    import _dp_worker as W

    m = W.module("dapo", "R2")
    m.policy.cuda()
    metrics = m.update(W.batch().to("cuda"))
    assert next(m.policy.parameters()).device.type == "cuda" and metrics["routing/layers_hit"] >= 1

