"""Per-token log-probabilities and entropy, memory-bounded.

For the sampled token y_t at position t, with logits z_t = h_t·Wᵀ / τ (hidden state h_t, LM head W, temperature τ):

    logprob_t = z_t[y_t] − logsumexp(z_t)            entropy_t = logsumexp(z_t) − Σ_v softmax(z_t)_v · z_t[v]

The naive computation materialises float32 logits ``[B, T, V]`` and their log-softmax: at V = 151,936 and
T = 8,192 that is ~5 GB per copy. Here the work is chunked over tokens: each chunk of ``chunk_size`` tokens
projects, upcasts to float32, reduces to two numbers per token and drops its logits. With gradient enabled each chunk
runs under activation checkpointing, so backward recomputes one chunk's logits at a time instead of keeping all of
them: peak extra memory is O(chunk_size · V), independent of T (benchmarks/train_step.py measures it).

    from pgzoo.models.logprobs import token_logprobs_and_entropy, completion_logprobs
    out = token_logprobs_and_entropy(hidden, targets, lm_head=model.lm_head, temperature=0.7)
    out.logprobs, out.entropy                       # [B, T] float32 each
    out = completion_logprobs(model, prompt_ids, prompt_mask, completion_ids)   # an HF causal LM, end to end

Temperature matches the sampler: a rollout engine that samples at τ reports log μ of the τ-scaled distribution, so
the trainer must score with the same τ for the training–inference ratio to mean anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from pgzoo.errors import ConfigError

DEFAULT_CHUNK_SIZE = None
CHUNK_ELEMENTS = 2**26
"""With ``chunk_size=None`` a chunk holds about this many logits (256 MB in float32): 441 tokens at V = 151,936."""


def auto_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk so that one chunk's float32 logits stay near :data:`CHUNK_ELEMENTS`."""
    return max(1, CHUNK_ELEMENTS // max(int(vocab_size), 1))


@dataclass
class TokenLogprobs:
    """``logprobs`` ``[B, T]`` (carries grad when the input does) and ``entropy`` ``[B, T]`` (detached; None when
    not asked for), both float32."""

    logprobs: torch.Tensor
    entropy: torch.Tensor | None


def _chunk_stats(x: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                 inv_temperature: float, with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logprob and entropy of ``n`` flat tokens. ``x`` is ``[n, H]`` hidden (with ``weight``) or ``[n, V]`` logits."""
    logits = x if weight is None else torch.nn.functional.linear(x, weight, bias)
    logits = logits.float()
    if inv_temperature != 1.0:
        logits = logits * inv_temperature
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(-1, targets[:, None]).squeeze(-1)
    logprob = picked - lse
    if with_entropy:
        with torch.no_grad():
            probs = torch.softmax(logits.detach(), dim=-1)
            # Σ_v p_v z_v as a batched dot product: no second [n, V] temporary
            entropy = lse.detach() - (probs.unsqueeze(-2) @ logits.detach().unsqueeze(-1)).reshape(-1)
            del probs
    else:
        entropy = torch.zeros_like(lse).detach()
    return logprob, entropy


def token_logprobs_and_entropy(
    model_or_hidden,
    targets: torch.Tensor,
    *,
    lm_head=None,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    with_entropy: bool = True,
    checkpoint_chunks: bool | None = None,
) -> TokenLogprobs:
    """Per-token log π(y_t) and entropy of the τ-scaled distribution, chunked over tokens.

    Args:
        model_or_hidden: one of
            - hidden states ``[B, T, H]`` aligned with ``targets`` (position t predicts ``targets[:, t]``), with
              ``lm_head`` an ``nn.Linear`` or a ``[V, H]`` weight;
            - logits ``[B, T, V]`` (``lm_head=None``): already materialised, still reduced chunk by chunk so no
              second float32 copy is made;
            - a Hugging Face causal LM: then ``input_ids`` ``[B, S]`` (and ``attention_mask``) are the full
              sequences and ``targets`` ``[B, T]`` their last T tokens (see :func:`completion_logprobs`).
        targets: ``[B, T]`` long, the tokens whose probability is wanted.
        temperature: τ > 0; logits are divided by τ before the softmax.
        chunk_size: tokens per chunk; peak extra memory ~ a few chunk_size · V · 4 bytes. None (default): about
            2**26 logits per chunk (:func:`auto_chunk_size`).
        with_entropy: also return the entropy (computed without grad).
        checkpoint_chunks: recompute each chunk's logits in backward (default: whenever grad is enabled).

    Returns:
        :class:`TokenLogprobs` with float32 ``[B, T]`` tensors.

    Example:
        >>> h = torch.randn(2, 5, 16); head = torch.nn.Linear(16, 50, bias=False)
        >>> out = token_logprobs_and_entropy(h, torch.randint(0, 50, (2, 5)), lm_head=head, chunk_size=3)
        >>> out.logprobs.shape
        torch.Size([2, 5])
    """
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature!r}; use the sampler's temperature (1.0 default)")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ConfigError(f"chunk_size must be a positive int or None (automatic), got {chunk_size!r}")
    if isinstance(model_or_hidden, torch.nn.Module):
        if input_ids is None:
            raise ConfigError("token_logprobs_and_entropy(model, ...) needs input_ids=[B, S] (the full sequences)")
        return _from_model(model_or_hidden, input_ids, attention_mask, targets, temperature=temperature,
                           chunk_size=chunk_size, with_entropy=with_entropy, checkpoint_chunks=checkpoint_chunks)
    x = model_or_hidden
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ConfigError("model_or_hidden must be a model, or a [B, T, H] hidden / [B, T, V] logits tensor, got "
                          f"{type(x).__name__} {tuple(getattr(x, 'shape', ()))}")
    if targets.shape != x.shape[:2]:
        raise ConfigError(f"targets shape {tuple(targets.shape)} does not match the first two dims of "
                          f"{tuple(x.shape)}; pass one target token per position")
    weight = bias = None
    if lm_head is not None:
        weight = lm_head.weight if isinstance(lm_head, torch.nn.Module) else lm_head
        bias = getattr(lm_head, "bias", None) if isinstance(lm_head, torch.nn.Module) else None
        if weight.shape[-1] != x.shape[-1]:
            raise ConfigError(f"lm_head expects hidden size {weight.shape[-1]}, hidden states have {x.shape[-1]}")
    B, T = targets.shape
    if chunk_size is None:
        chunk_size = auto_chunk_size(weight.shape[0] if weight is not None else x.shape[-1])
    flat_x = x.reshape(B * T, x.shape[-1])
    flat_t = targets.reshape(B * T).long()
    grad = torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad))
    use_ckpt = grad if checkpoint_chunks is None else (checkpoint_chunks and grad)
    inv_t = 1.0 / float(temperature)
    lps, ents = [], []
    for start in range(0, B * T, chunk_size):
        xs, ts = flat_x[start:start + chunk_size], flat_t[start:start + chunk_size]
        if use_ckpt:
            lp, ent = checkpoint(_chunk_stats, xs, ts, weight, bias, inv_t, with_entropy, use_reentrant=False)
        else:
            lp, ent = _chunk_stats(xs, ts, weight, bias, inv_t, with_entropy)
        lps.append(lp)
        ents.append(ent)
    logprobs = torch.cat(lps).view(B, T)
    entropy = torch.cat(ents).view(B, T).detach() if with_entropy else None
    return TokenLogprobs(logprobs, entropy)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: the first real token is position 0, as an inference engine numbers it."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def _from_model(model, input_ids, attention_mask, targets, **kwargs) -> TokenLogprobs:
    T = targets.shape[1]
    if input_ids.shape[1] <= T:
        raise ConfigError(f"input_ids has {input_ids.shape[1]} positions but targets need {T} plus a prompt; pass "
                          "the full sequence (prompt + completion)")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    body = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    head = model.get_output_embeddings()
    kw = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
              use_cache=False)
    if _is_fsdp(model):
        out = _body_output_through_root(model, body, kw)
    else:
        out = body(**kw)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    hidden = hidden[:, -T - 1:-1]  # position s predicts token s + 1
    return token_logprobs_and_entropy(hidden, targets, lm_head=head, **kwargs)


def _is_fsdp(model) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, FSDPModule)


def _body_output_through_root(model, body, kw):
    """FSDP2-sharded model: run the ROOT forward (its hooks all-gather the embeddings, final norm and LM head, and
    keep them unsharded for the backward, which reduce-scatters their gradients), computing logits for one position
    only, and take the decoder's output from a hook; the head then runs chunk by chunk as without FSDP."""
    captured = {}
    handle = body.register_forward_hook(lambda module, args, output: captured.setdefault("out", output))
    try:
        model(**kw, logits_to_keep=1)
    finally:
        handle.remove()
    return captured["out"]


def completion_logprobs(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
                        completion_mask: torch.Tensor | None = None, *, temperature: float = 1.0,
                        chunk_size: int | None = DEFAULT_CHUNK_SIZE, with_entropy: bool = True) -> TokenLogprobs:
    """Log-probs of right-padded completions after left-padded prompts under an HF causal LM (one forward).

    Shapes: ``prompt_ids``/``prompt_mask`` ``[B, P]``, ``completion_ids``/``completion_mask`` ``[B, T]``. Padding
    positions get values too (finite, meaningless): mask them downstream.
    """
    if completion_mask is None:
        completion_mask = torch.ones_like(completion_ids)
    input_ids = torch.cat([prompt_ids, completion_ids], 1)
    attention_mask = torch.cat([prompt_mask.long(), completion_mask.long()], 1)
    return token_logprobs_and_entropy(model, completion_ids, input_ids=input_ids, attention_mask=attention_mask,
                                      temperature=temperature, chunk_size=chunk_size, with_entropy=with_entropy)


def naive_logprobs_and_entropy(logits: torch.Tensor, targets: torch.Tensor,
                               temperature: float = 1.0) -> TokenLogprobs:
    """Reference: full float32 log-softmax over ``[B, T, V]`` (what the chunked version must equal)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    lp = logp.gather(-1, targets[..., None].long()).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    return TokenLogprobs(lp, ent.detach())
