"""FP8 (e4m3) fake quantisation: round weights through ``torch.float8_e4m3fn`` and back, in place.

For a weight W and a scale s (per tensor, or per output channel: one per row of a 2-D weight / per expert and row
of a 3-D fused expert weight),

    s = max|W| / 448            (448 = largest finite e4m3 value)
    Ŵ = float8_e4m3fn(W / s).to(W.dtype) · s

so Ŵ is exactly what an FP8 inference engine with that scaling multiplies by. Used by
:class:`~pgzoo.rollout.TransformersEngine` (``fp8=True``) to create the paper's stress test — FP8 rollouts
against a higher-precision trainer — on any machine: the rollout policy μ differs from the trainer's π_θold by a
controlled, measurable amount (see docs/rollout.md for the measured |Δ log μ| and KL).

What is quantised: the matmul weights of attention and MLP / experts (2-D ``*.weight`` of linear layers and 3-D
fused expert tensors). Embeddings, the LM head, norms, biases and MoE routers stay in full precision, as FP8
inference stacks usually keep them.
"""

from __future__ import annotations

import re

import torch

from pgzoo.errors import ConfigError

E4M3_MAX = 448.0
GRANULARITIES = ("per-tensor", "per-channel")
# Parameters left in full precision: embeddings, LM head, norms, routers (Qwen/Mixtral `mlp.gate`, OLMoE/others
# `router`), and the Qwen2-MoE shared-expert gate (a [1, H] scalar gate).
SKIP = re.compile(r"(embed|lm_head|norm|\.gate\.weight$|router|shared_expert_gate|\.bias$)")


def quantize_fp8_tensor(weight: torch.Tensor, granularity: str = "per-channel") -> torch.Tensor:
    """Return ``weight`` rounded through FP8 e4m3 with a per-tensor or per-output-channel scale (same dtype).

    Args:
        weight: ``[out, in]`` or ``[E, out, in]`` floating tensor.
        granularity: ``"per-tensor"`` (one scale) or ``"per-channel"`` (one scale per output row, per expert).

    Example:
        >>> w = torch.randn(4, 8)
        >>> (quantize_fp8_tensor(w) - w).abs().max() <= w.abs().max() / 16   # e4m3 keeps 3 mantissa bits
        tensor(True)
    """
    if granularity not in GRANULARITIES:
        raise ConfigError(f"fp8 granularity={granularity!r}: choose one of {', '.join(GRANULARITIES)}")
    w = weight.detach().float()
    if granularity == "per-tensor" or w.dim() < 2:
        amax = w.abs().amax()
    else:
        amax = w.abs().amax(dim=-1, keepdim=True)
    scale = (amax / E4M3_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    q = (w / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return (q.float() * scale).to(weight.dtype)


def fp8_parameter_names(model: torch.nn.Module) -> list[str]:
    """Names of the parameters :func:`fake_quantize_fp8` rounds (see the module docstring)."""
    return [name for name, p in model.named_parameters() if p.is_floating_point() and p.dim() in (2, 3)
            and not SKIP.search(name)]


@torch.no_grad()
def fake_quantize_fp8(model: torch.nn.Module, granularity: str = "per-channel") -> list[str]:
    """Round the matmul weights of ``model`` through FP8 e4m3 in place; return the names rounded."""
    names = fp8_parameter_names(model)
    params = dict(model.named_parameters())
    for name in names:
        p = params[name]
        p.copy_(quantize_fp8_tensor(p, granularity))
    return names
