"""Record the expert ids an MoE model routes each token to.

    with pgzoo.routing.record(model) as rec:
        model(input_ids, attention_mask=attention_mask)
    rec.routes            # long [B, S, L_moe, k]: top-k expert ids per token and MoE layer, router order

Recording hooks each router (``block.gate``) and reads the ids it returns; nothing in the forward changes. Each
forward through the model appends one step per MoE layer; :attr:`Recording.routes` concatenates the steps along the
sequence axis. That is what makes recording around ``model.generate`` work: the prefill step holds the prompt
positions ``[N, P]`` and each decode step one more position ``[N, 1]``, so a generate call with output sequences
of length ``P + T`` yields routes for positions ``0 .. P+T-2``. The last generated token is never fed back through
the model, so it has no route; :meth:`Recording.aligned` pads it (and any other missing tail) with
:data:`UNROUTED` (-1), which replay treats as "let the router choose" (that position's output feeds no logprob of
the sequence). Record one forward, or one generate call (greedy or sampling; beam search reorders rows between
steps and is not supported), per context.

Forwards recomputed by gradient checkpointing during backward are not recorded again.
"""

from __future__ import annotations

import torch

from pgzoo.errors import RoutingError
from pgzoo.routing.families import MoeLayer, find_moe_layers

UNROUTED = -1
"""Route value meaning "no recorded route here": replay lets the current router choose at that token and layer."""


def in_backward() -> bool:
    """True while autograd runs a backward pass (where gradient checkpointing recomputes forwards)."""
    return torch._C._current_graph_task_id() != -1


def block_shape(args: tuple) -> tuple[int, ...]:
    """Leading (batch, seq) shape of the hidden states a MoE block received (``(T,)`` for flattened input)."""
    hidden = args[0] if args else None
    if not isinstance(hidden, torch.Tensor):
        raise RoutingError("MoE block called without a hidden-states tensor as first argument; cannot align routes")
    return tuple(hidden.shape[:-1])


class Recording:
    """Routes seen while a :func:`record` context was open.

    Attributes:
        layers: the model's MoE layers (``layers[i].layer_index`` is the decoder layer of route slot ``i``).
        steps: per forward, the routes ``[B, S_step, L, k]`` it produced (generate: prefill then decode steps).
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.layers: list[MoeLayer] = find_moe_layers(model)
        self._calls: list[list[torch.Tensor]] = [[] for _ in self.layers]
        self._shape: list[tuple[int, ...] | None] = [None] * len(self.layers)
        self._handles: list = []
        self._cache: torch.Tensor | None = None

    # -- hooks -----------------------------------------------------------------------------------------------
    def _install(self) -> None:
        for layer in self.layers:
            self._handles.append(layer.block.register_forward_pre_hook(self._block_hook(layer.slot)))
            self._handles.append(layer.router.register_forward_hook(self._router_hook(layer.slot)))

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _block_hook(self, slot: int):
        def hook(module, args):
            self._shape[slot] = block_shape(args)

        return hook

    def _router_hook(self, slot: int):
        def hook(module, args, output):
            if in_backward():  # gradient-checkpointing recomputation: same tokens, already recorded
                return None
            ids = output[2].detach()
            shape = self._shape[slot] or (1, ids.shape[0])
            if len(shape) == 1:
                shape = (1, shape[0])
            self._calls[slot].append(ids.reshape(*shape, ids.shape[-1]).long())
            self._cache = None
            return None

        return hook

    def __enter__(self) -> Recording:
        self._install()
        return self

    def __exit__(self, *exc) -> None:
        self._remove()

    # -- results ---------------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def top_k(self) -> int:
        return self.layers[0].top_k

    @property
    def num_experts(self) -> int:
        return self.layers[0].num_experts

    @property
    def layers_hit(self) -> int:
        """Number of MoE layers that recorded at least one forward."""
        return sum(1 for calls in self._calls if calls)

    @property
    def num_forwards(self) -> int:
        return max((len(calls) for calls in self._calls), default=0)

    @property
    def steps(self) -> list[torch.Tensor]:
        self._check_complete()
        return [torch.stack([calls[i] for calls in self._calls], dim=2) for i in range(self.num_forwards)]

    def _check_complete(self) -> None:
        counts = [len(calls) for calls in self._calls]
        if not any(counts):
            raise RoutingError(
                f"no forward through the MoE layers of {type(self.model).__name__} was recorded: run the model "
                f"(or model.generate) inside `with record(model)`, on the same model object"
            )
        if len(set(counts)) != 1:
            missed = [layer.layer_index for layer, n in zip(self.layers, counts) if n < max(counts)]
            raise RoutingError(f"recording incomplete: MoE layers {missed} saw fewer forwards than others ({counts})")

    @property
    def routes(self) -> torch.Tensor:
        """Long ``[B, S, L_moe, k]``: every recorded step concatenated along the sequence axis."""
        if self._cache is None:
            steps = self.steps
            if len({s.shape[0] for s in steps}) != 1:
                raise RoutingError(
                    f"recorded forwards have different batch sizes {[s.shape[0] for s in steps]}: record one "
                    f"forward or one generate call per context (or read `rec.steps`)"
                )
            if any(s.shape[1] != 1 for s in steps[1:]):
                raise RoutingError(
                    f"recorded {len(steps)} forwards of lengths {[s.shape[1] for s in steps][:6]}: `routes` joins a "
                    f"prefill and KV-cached decode steps of one token each. Independent forwards (or generate with "
                    f"use_cache=False): read `rec.steps`, or record each forward in its own context"
                )
            self._cache = steps[0] if len(steps) == 1 else torch.cat(steps, dim=1)
        return self._cache

    def aligned(self, length: int, fill: int = UNROUTED) -> torch.Tensor:
        """:attr:`routes` right-padded with ``fill`` to ``length`` positions.

        After ``model.generate`` that returned ``sequences`` ``[N, P+T]``, ``rec.aligned(sequences.shape[1])`` is
        aligned to ``sequences`` positions; the last token (never fed back) holds :data:`UNROUTED`.
        """
        routes = self.routes
        have = routes.shape[1]
        if length < have:
            raise RoutingError(f"aligned(length={length}) is shorter than the {have} recorded positions")
        if length == have:
            return routes
        pad = routes.new_full((routes.shape[0], length - have, *routes.shape[2:]), fill)
        return torch.cat([routes, pad], dim=1)


def record(model: torch.nn.Module) -> Recording:
    """Context manager recording the top-k expert ids of every MoE layer of ``model``.

    Args:
        model: a transformers MoE model (Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE), any wrapper of one (PEFT,
            ``*ForCausalLM``), or its inner ``model``.

    Returns:
        A :class:`Recording`; ``rec.routes`` is long ``[B, S, L_moe, k]`` (``L_moe`` counts MoE layers only).

    Example:
        >>> with pgzoo.routing.record(model) as rec:
        ...     model(ids, attention_mask=am)
        >>> rec.routes.shape        # [B, S, L_moe, k]

    Raises:
        RoutingError: the model has no supported MoE layers (the message names its class).
    """
    return Recording(model)
