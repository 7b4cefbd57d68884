"""pgzoo.models.logprobs: chunked per-token logprobs/entropy equal the naive full-softmax reference (values and grads)."""

import pytest
import torch

from pgzoo.errors import ConfigError
from pgzoo.models.logprobs import (
    completion_logprobs,
    naive_logprobs_and_entropy,
    position_ids_from_mask,
    token_logprobs_and_entropy,
)


def _naive_loop(hidden, weight, targets, temperature):
    """Float64 per-token loop: the definition, written out."""
    B, T, _ = hidden.shape
    lp = torch.zeros(B, T, dtype=torch.float64)
    ent = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            z = (hidden[b, t].double() @ weight.double().T) / temperature
            logp = z - torch.logsumexp(z, 0)
            lp[b, t] = logp[targets[b, t]]
            ent[b, t] = -(logp.exp() * logp).sum()
    return lp, ent


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_hidden_matches_float64_loop(chunk, temperature):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 5, 16, generator=g)
    head = torch.nn.Linear(16, 40, bias=False)
    targets = torch.randint(0, 40, (3, 5), generator=g)
    out = token_logprobs_and_entropy(hidden, targets, lm_head=head, temperature=temperature, chunk_size=chunk)
    ref_lp, ref_ent = _naive_loop(hidden, head.weight.detach(), targets, temperature)
    assert out.logprobs.dtype == torch.float32 and out.logprobs.shape == (3, 5)
    torch.testing.assert_close(out.logprobs.double(), ref_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.entropy.double(), ref_ent, atol=1e-5, rtol=1e-5)


def test_gradients_match_naive_with_checkpointed_chunks():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 9, 8, generator=g, requires_grad=True)
    weight = torch.randn(30, 8, generator=g, requires_grad=True)
    targets = torch.randint(0, 30, (2, 9), generator=g)
    coef = torch.randn(2, 9, generator=g)
    out = token_logprobs_and_entropy(hidden, targets, lm_head=weight, chunk_size=4, temperature=0.9)
    (out.logprobs * coef).sum().backward()
    gh, gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ref = naive_logprobs_and_entropy(hidden @ weight.T, targets, temperature=0.9)
    (ref.logprobs * coef).sum().backward()
    torch.testing.assert_close(gh, hidden.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw, weight.grad, atol=1e-5, rtol=1e-5)
    assert not out.entropy.requires_grad


def test_logits_input_and_bfloat16_upcast():
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(2, 6, 50, generator=g) * 3).bfloat16()
    targets = torch.randint(0, 50, (2, 6), generator=g)
    out = token_logprobs_and_entropy(logits, targets, chunk_size=5)
    ref = naive_logprobs_and_entropy(logits, targets)
    assert out.logprobs.dtype == torch.float32
    torch.testing.assert_close(out.logprobs, ref.logprobs, atol=1e-5, rtol=1e-5)
    # a wrong reference (no temperature applied on one side) must fail the same tolerance
    wrong = naive_logprobs_and_entropy(logits, targets, temperature=0.8)
    assert not torch.allclose(out.logprobs, wrong.logprobs, atol=1e-3)


def test_bad_arguments_raise_config_errors():
    h = torch.randn(1, 2, 4)
    with pytest.raises(ConfigError, match="temperature"):
        token_logprobs_and_entropy(h, torch.zeros(1, 2, dtype=torch.long), lm_head=torch.randn(5, 4), temperature=0)
    with pytest.raises(ConfigError, match="targets shape"):
        token_logprobs_and_entropy(h, torch.zeros(1, 3, dtype=torch.long), lm_head=torch.randn(5, 4))
    with pytest.raises(ConfigError, match="hidden size"):
        token_logprobs_and_entropy(h, torch.zeros(1, 2, dtype=torch.long), lm_head=torch.randn(5, 3))
    with pytest.raises(ConfigError, match="chunk_size"):
        token_logprobs_and_entropy(h, torch.zeros(1, 2, dtype=torch.long), lm_head=torch.randn(5, 4), chunk_size=0)


def test_position_ids_skip_left_padding():
    am = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(am).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


@pytest.fixture(scope="module")
def tiny_model():
    from pgzoo.models import build_tiny_moe

    return build_tiny_moe(seed=0)


def test_completion_logprobs_match_full_forward_and_ignore_left_padding(tiny_model):
    g = torch.Generator().manual_seed(3)
    V = tiny_model.config.vocab_size
    prompt = torch.randint(4, V, (1, 4), generator=g)
    completion = torch.randint(4, V, (1, 3), generator=g)
    # reference: unpadded full forward, log-softmax of the logits that predict each completion token
    ids = torch.cat([prompt, completion], 1)
    with torch.no_grad():
        logits = tiny_model(ids).logits[:, 3:6]
        ref = naive_logprobs_and_entropy(logits, completion)
        out = completion_logprobs(tiny_model, prompt, torch.ones_like(prompt), completion, chunk_size=2)
        # the same row left-padded by two inside a batch: identical values (positions skip the padding)
        pad_prompt = torch.cat([torch.zeros(1, 2, dtype=torch.long), prompt], 1)
        pm = torch.tensor([[0, 0, 1, 1, 1, 1]])
        out_pad = completion_logprobs(tiny_model, pad_prompt, pm, completion, chunk_size=2)
    torch.testing.assert_close(out.logprobs, ref.logprobs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.entropy, ref.entropy, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_pad.logprobs, ref.logprobs, atol=1e-4, rtol=1e-4)
