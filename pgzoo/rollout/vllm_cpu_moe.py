"""vLLM's CPU fused-MoE kernel: writing expert weights in place, one expert at a time, in its prepacked layout.

vLLM's CPU MoE kernel (``CPUUnquantizedExperts``) reads ``w13`` [E, 2I', H] and ``w2`` [E, H, I'] in the layout
``cpu_prepack_moe_weight`` produces at load time, with the intermediate size I zero-padded to I' (a multiple of 32).
vLLM's in-place reload leaves the plain layout there (every MoE layer then computes garbage) or fails when I' != I,
so :class:`~pgzoo.rollout.VLLMEngine` routes per-expert checkpoint tensors here instead: each is padded as the
kernel pads, prepacked alone and copied into its expert's slot. That relies on the packed layout being separable by
expert and by the gate / up halves of ``w13``, which :func:`cpu_moe_targets` checks on a probe at every sync.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from pgzoo.errors import EngineError

# A checkpoint name of one expert's weight: model.layers.3.mlp.experts.17.gate_proj.weight
EXPERT_NAME = re.compile(r"(?P<prefix>.+)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")


def _cpu_moe_layers(model):
    """``(transformers-style prefix, module, fused_experts)`` of every CPU fused-MoE layer of a vLLM model."""
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    for name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        fe = getattr(getattr(method, "moe_kernel", None), "fused_experts", None)
        if isinstance(fe, CPUUnquantizedExperts) and not getattr(fe, "_use_zentorch", False):
            yield name.removesuffix(".routed_experts"), module, fe


def cpu_moe_targets(worker) -> dict[str, CPUExperts]:
    """Worker-side (in process): the CPU fused-MoE layers' kernel tensors, by transformers module prefix
    (``model.layers.3.mlp.experts``), after checking on a probe that the kernel's prepacked layout is separable by
    expert and by the gate / up halves (what a per-expert in-place write relies on)."""
    from vllm._custom_ops import cpu_prepack_moe_weight

    out = {}
    for prefix, module, fe in _cpu_moe_layers(worker.model_runner.get_model()):
        w13, w2 = module.w13_weight, module.w2_weight
        padded = w13.shape[1] // 2
        probe = torch.randn(2, 2 * padded, w13.shape[2], generator=torch.Generator().manual_seed(0)).to(w13.dtype)
        whole = cpu_prepack_moe_weight(probe, fe.isa)
        parts = torch.cat([torch.cat([cpu_prepack_moe_weight(probe[e:e + 1, h * padded:(h + 1) * padded]
                                                             .contiguous(), fe.isa) for h in (0, 1)], 1)
                           for e in (0, 1)])
        if not torch.equal(whole, parts):
            raise EngineError(f"{prefix}: this vLLM CPU build packs MoE expert weights in a layout pgzoo cannot "
                              f"write expert by expert; use the transformers engine or another vLLM version")
        out[prefix] = CPUExperts(w13, w2, fe.isa, padded, *_tensor_parallel())
    return out


def _tensor_parallel() -> tuple[int, int]:
    """(rank, size) of this worker in vLLM's tensor-parallel group: experts are split along the intermediate size."""
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()


@dataclass
class CPUExperts:
    """A CPU fused-MoE layer's kernel tensors: ``w13`` [E, 2I', H] and ``w2`` [E, H, I'] in the kernel's prepacked
    layout, its ISA, the padded intermediate size I' of this tensor-parallel rank (the kernel zero-pads its share of
    I to its alignment, 32), and the rank's place in vLLM's tensor-parallel group."""

    w13: torch.Tensor
    w2: torch.Tensor
    isa: str
    padded: int
    tp_rank: int = 0
    tp_size: int = 1

    @torch.no_grad()
    def write(self, expert: int, proj: str, weight: torch.Tensor) -> None:
        """Write one expert's checkpoint tensor (``gate_proj`` / ``up_proj`` [I, H], ``down_proj`` [H, I]) in
        place: this rank's share of I (tensor parallelism), zero-padded to I' as the kernel pads at load time,
        prepacked for its ISA."""
        from vllm._custom_ops import cpu_prepack_moe_weight

        if expert >= self.w13.shape[0]:
            raise EngineError(f"expert {expert} does not exist in this engine's MoE layer ({self.w13.shape[0]} "
                              f"experts): expert parallelism on CPU is not supported by pgzoo's weight sync")
        weight = weight.to(self.w13.dtype)
        inter = weight.shape[1] if proj == "down_proj" else weight.shape[0]
        share = inter // self.tp_size
        if self.tp_size > 1:  # vLLM splits each expert's intermediate size evenly over the tensor-parallel ranks
            rows = slice(self.tp_rank * share, (self.tp_rank + 1) * share)
            weight = weight[:, rows] if proj == "down_proj" else weight[rows]
        if proj == "down_proj":
            plain = weight.new_zeros(1, weight.shape[0], self.padded)
            plain[0, :, : weight.shape[1]] = weight
            self.w2.data[expert: expert + 1].copy_(cpu_prepack_moe_weight(plain, self.isa))
            return
        plain = weight.new_zeros(1, self.padded, weight.shape[1])
        plain[0, : weight.shape[0]] = weight
        half = 0 if proj == "gate_proj" else self.padded
        self.w13.data[expert: expert + 1, half: half + self.padded].copy_(cpu_prepack_moe_weight(plain, self.isa))
