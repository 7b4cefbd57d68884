"""MiniRL's central claim on a policy small enough to enumerate every sequence.

A tabular autoregressive policy over V = 3 tokens and T = 3 steps (27 sequences, one logit vector per prefix).
The sampler μ has logits φ; the trained policy π_θ has θ = φ + δ·Δ, so every per-token ratio is π_θ/μ = 1 + O(δ).
With exact expectations over all 27 sequences:

    J_seq(θ)   = Σ_y μ(y) · π_θ(y)/μ(y) · R(y)
    J_token(θ) = Σ_y μ(y) · Σ_t π_θ(y_t|y<t)/μ(y_t|y<t) · R(y)

The token-level objective is the first-order expansion of the sequence-level one around π_θ = μ:
J_seq(θ) − J_seq(φ) = J_token(θ) − J_token(φ) + O(δ²)  (fitted log-log slope 2). Differentiating that O(δ²)
remainder along θ leaves O(δ): the gradients coincide exactly at δ = 0 and differ by O(δ) (slope 1) away from it —
so the token surrogate's gradient is right only while δ is small, which is the paper's argument for keeping both the
training–inference discrepancy and the staleness small. The gradient of the token objective is taken from pgzoo's
``minirl`` objective itself (exact expectation: advantages μ(y)·R(y), num_sequences = 1).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import pgzoo

V, T = 3, 3
DELTAS = [0.2, 0.1, 0.05, 0.025, 0.0125, 0.00625]


def _setup(seed: int):
    g = torch.Generator().manual_seed(seed)
    seqs = list(itertools.product(range(V), repeat=T))
    prefixes = {p: k for k, p in enumerate(q for t in range(T) for q in itertools.product(range(V), repeat=t))}
    prefix_idx = torch.tensor([[prefixes[y[:t]] for t in range(T)] for y in seqs])
    tokens = torch.tensor(seqs)
    phi = torch.randn(len(prefixes), V, generator=g, dtype=torch.float64)
    direction = torch.randn(len(prefixes), V, generator=g, dtype=torch.float64)
    reward = torch.randn(len(seqs), generator=g, dtype=torch.float64)

    def token_logprobs(theta):
        return torch.log_softmax(theta, -1)[prefix_idx, tokens]  # [S, T]

    return phi, direction, reward, token_logprobs


def _objectives(theta, phi, reward, token_logprobs):
    lp, mu = token_logprobs(theta), token_logprobs(phi).detach()
    mu_seq = mu.sum(-1).exp()
    j_seq = (mu_seq * (lp.sum(-1) - mu.sum(-1)).exp() * reward).sum()
    j_tok = (mu_seq[:, None] * (lp - mu).exp() * reward[:, None]).sum()
    return lp, mu, mu_seq, j_seq, j_tok


def _pgzoo_token_gradient(name, theta, lp, mu, mu_seq, reward):
    """∇_θ of pgzoo's loss on the batch of all sequences, weighted so that the batch sum is the expectation."""
    obj = pgzoo.get(name, is_cap=1e6)
    batch = pgzoo.TokenBatch(logprobs=lp, mask=torch.ones_like(lp, dtype=torch.bool), advantages=mu_seq * reward,
                             rollout_logprobs=mu, old_logprobs=mu, num_sequences=1)
    (g,) = torch.autograd.grad(obj(batch).loss, theta, retain_graph=True)
    return -g  # loss = −objective


def _slope(xs, ys):
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_token_objective_is_first_order_approximation(seed):
    phi, direction, reward, token_logprobs = _setup(seed)
    *_, j_seq0, j_tok0 = _objectives(phi, phi, reward, token_logprobs)
    value_err, grad_err, grad_norm = [], [], []
    for delta in DELTAS:
        theta = (phi + delta * direction).requires_grad_(True)
        lp, mu, mu_seq, j_seq, j_tok = _objectives(theta, phi, reward, token_logprobs)
        (g_seq,) = torch.autograd.grad(j_seq, theta, retain_graph=True)
        (g_tok,) = torch.autograd.grad(j_tok, theta, retain_graph=True)
        # pgzoo's minirl gradient is exactly the token-level gradient (minirl: once no token is clipped)
        clip_inactive = float((lp.detach() - mu).abs().max()) < math.log(1.2)
        for name in ("minirl", "minirl-no-clip") if clip_inactive else ("minirl-no-clip",):
            torch.testing.assert_close(_pgzoo_token_gradient(name, theta, lp, mu, mu_seq, reward), g_tok,
                                       rtol=1e-10, atol=1e-12)
        value_err.append(abs(float(((j_seq - j_seq0) - (j_tok - j_tok0)).detach())))
        grad_err.append(float((g_seq - g_tok).norm()))
        grad_norm.append(float(g_seq.norm()))
    value_slope, grad_slope = _slope(DELTAS, value_err), _slope(DELTAS, grad_err)
    assert 1.85 < value_slope < 2.15, (value_slope, value_err)  # J_token is J_seq to first order: error ~ δ²
    assert 0.85 < grad_slope < 1.15, (grad_slope, grad_err)  # so its gradient is off by O(δ)
    assert clip_inactive  # the smallest δ checked minirl itself
    assert grad_err[-1] / grad_norm[-1] < 0.05  # and small relative to the gradient when δ is small


@pytest.mark.parametrize("seed", [0, 1])
def test_gradients_coincide_when_policies_match(seed):
    """At π_θ = μ (δ = 0) the token surrogate's gradient *is* the sequence-level gradient (REINFORCE)."""
    phi, _, reward, token_logprobs = _setup(seed)
    theta = phi.clone().requires_grad_(True)
    lp, mu, mu_seq, j_seq, _ = _objectives(theta, phi, reward, token_logprobs)
    (g_seq,) = torch.autograd.grad(j_seq, theta, retain_graph=True)
    for name in ("minirl", "minirl-no-is"):
        torch.testing.assert_close(_pgzoo_token_gradient(name, theta, lp, mu, mu_seq, reward), g_seq,
                                   rtol=1e-10, atol=1e-12)


def test_first_order_gap_metric_tracks_the_remainder():
    """``first_order/gap_total`` shrinks like δ² with the sequence-vs-expansion remainder it reports."""
    phi, direction, reward, token_logprobs = _setup(0)
    gaps = []
    for delta in DELTAS:
        theta = phi + delta * direction
        lp, mu = token_logprobs(theta), token_logprobs(phi)
        batch = pgzoo.TokenBatch(logprobs=lp, mask=torch.ones_like(lp, dtype=torch.bool),
                                 advantages=reward, rollout_logprobs=mu, old_logprobs=mu)
        with torch.no_grad():  # metrics only: plain tensors are accepted without grad mode
            out = pgzoo.get("minirl")(batch)
        expected = ((lp - mu).sum(-1).exp() - (1 + ((lp - mu).exp() - 1).sum(-1))).abs().mean()
        torch.testing.assert_close(out.metrics["first_order/gap_total"], expected, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(out.metrics["first_order/gap_staleness"], expected, rtol=1e-10, atol=1e-14)
        assert float(out.metrics["first_order/gap_train_inference"]) == 0.0
        gaps.append(float(expected))
    assert 1.85 < _slope(DELTAS, gaps) < 2.15
