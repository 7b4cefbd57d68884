"""Replay recorded MoE routes: force each token's expert ids, keep the router's gradient.

    with pgzoo.routing.replay(model, routes) as rp:      # routes: long [B, S, L_moe, k]
        out = model(input_ids, attention_mask=attention_mask)
    rp.layers_hit                                        # MoE layers whose routing was forced
    rp.natural_routes                                    # what the current router would have chosen

At every MoE layer ℓ and token t the experts run on the forced ids ``r[t, ℓ]`` with gate weights taken from the
current router's full softmax, ``w = p_θ(r | h_t) (/ Σ_k p_θ(r | h_t) where the family renormalises)``, so
∂loss/∂W_router is the gradient of the replayed forward (see :mod:`pgzoo.routing.families`). With routes recorded
on the same weights and inputs the forward is bit-identical to the plain one.

Every forward inside the context sees the *same* routes (no cursor), so a forward recomputed by gradient
checkpointing replays the same ids. Slice rows first for micro-batches: ``replay(model, routes[rows])``.

Replay proves it took effect. It raises :class:`~pgzoo.errors.RoutingError` when

* ``routes`` has the wrong rank, dtype, layer count or top-k, or its ``[B, S]`` does not match a forward's input;
* an id is outside ``[0, num_experts)`` (:data:`~pgzoo.routing.record.UNROUTED` = -1 is allowed for a whole
  token-layer slot: the router chooses there);
* routes are degenerate: one expert repeated within a token's top-k (all-zero routes with k > 1), every slot
  unrouted, or with k = 1 every one of at least 16 slots on the same expert;
* a forward of the wrapped model hits fewer MoE layers than the routes hold, or the context ends without any
  MoE layer having been forced (a silent no-op: e.g. the forward ran on a different model object);
* gradient checkpointing is on, a forward with grad ran in training mode, and the context closed before backward
  (the recomputation would otherwise route naturally: silently wrong gradients). Run backward inside the context.
"""

from __future__ import annotations

import torch

from pgzoo.errors import RoutingError
from pgzoo.routing.families import MoeLayer, find_moe_layers
from pgzoo.routing.record import UNROUTED, block_shape, in_backward

DEGENERATE_MIN_SLOTS = 16


def check_routes(routes: torch.Tensor, layers: list[MoeLayer], where: str = "routes") -> None:
    """Validate a route tensor against a model's MoE layers; raise :class:`RoutingError` naming the problem.

    One host sync (the value checks); shapes, dtype and layer count are checked first and free.
    """
    if not isinstance(routes, torch.Tensor):
        raise RoutingError(
            f"{where} must be a torch.Tensor of expert ids [B, S, L_moe, k], got {type(routes).__name__}"
        )
    if routes.is_floating_point() or routes.is_complex() or routes.dtype == torch.bool:
        raise RoutingError(f"{where} must hold integer expert ids, got dtype {routes.dtype}; use routes.long()")
    num_layers, top_k, num_experts = len(layers), layers[0].top_k, layers[0].num_experts
    if routes.dim() != 4:
        raise RoutingError(
            f"{where} must be [B, S, L_moe, k] = [B, S, {num_layers}, {top_k}], got shape {tuple(routes.shape)}"
            + ("; add the batch axis with routes.unsqueeze(0)" if routes.dim() == 3 else "")
        )
    if routes.shape[2] != num_layers:
        raise RoutingError(
            f"{where} hold {routes.shape[2]} MoE layers but the model has {num_layers} "
            f"(decoder layers {[layer.layer_index for layer in layers]}); routes from a different model or one "
            f"that also counted dense layers?"
        )
    if routes.shape[3] != top_k:
        raise RoutingError(f"{where} hold top-{routes.shape[3]} ids but the model routes top-{top_k}")
    if routes.numel() == 0:
        raise RoutingError(f"{where} are empty (shape {tuple(routes.shape)})")
    unrouted = routes == UNROUTED
    partly = unrouted.any(-1) & ~unrouted.all(-1)
    experts = torch.tensor([layer.num_experts for layer in layers], device=routes.device)[:, None]  # per slot
    bad_range = ((routes < 0) & ~unrouted) | (routes >= experts)
    routed = ~unrouted.all(-1)
    srt = routes.sort(dim=-1).values
    dup = (srt[..., 1:] == srt[..., :-1]).any(-1) & routed if top_k > 1 else torch.zeros_like(routed)
    first = routes[routed][:1]
    constant = top_k == 1 and bool(routed.sum() >= DEGENERATE_MIN_SLOTS) and bool((routes[routed] == first).all())
    flags = torch.stack([bad_range.any(), partly.any(), dup.any(), routed.any()]).tolist()
    if flags[0]:
        bad = routes[bad_range]
        raise RoutingError(
            f"{where} hold expert ids outside [0, {num_experts}) (e.g. {bad[:4].tolist()}); "
            f"only -1 (UNROUTED) may mark a slot without a route"
        )
    if flags[1]:
        raise RoutingError(f"{where}: a token's top-{top_k} ids mix -1 (UNROUTED) with expert ids; use -1 for all k")
    if flags[2]:
        n = int(dup.sum())
        raise RoutingError(
            f"{where} are degenerate: {n} token-layer slots repeat one expert within their top-{top_k} "
            f"(all-zero routes from an engine that did not record?)"
        )
    if not flags[3]:
        raise RoutingError(f"{where} are all -1 (UNROUTED): there is nothing to replay")
    if constant:
        raise RoutingError(f"{where} are degenerate: every slot routes to expert {int(first[0, 0])}")


class Replay:
    """Routes forced while a :func:`replay` context is open; see the module docstring."""

    def __init__(self, model: torch.nn.Module, routes: torch.Tensor, *, check: bool = True):
        self.model = model
        self.layers: list[MoeLayer] = find_moe_layers(model)
        if check:
            check_routes(routes, self.layers)
        elif routes.dim() != 4 or routes.shape[2] != len(self.layers):
            raise RoutingError(f"routes must be [B, S, {len(self.layers)}, k], got {tuple(routes.shape)}")
        self.routes = routes
        self.batch_shape = tuple(routes.shape[:2])
        tokens = routes.shape[0] * routes.shape[1]
        # Per layer: contiguous [B*S, k] ids on the router's device, and where -1 asks for the natural choice.
        self._forced: list[torch.Tensor] = []
        self._free: list[torch.Tensor | None] = []
        any_free = bool((routes[..., 0] == UNROUTED).any())
        for layer in self.layers:
            ids = routes[:, :, layer.slot].reshape(tokens, -1).to(layer.router.weight.device, torch.long)
            free = ids[:, 0] == UNROUTED if any_free else None
            self._forced.append(ids)
            self._free.append(free if free is not None and bool(free.any()) else None)
        self._shape: list[tuple[int, ...] | None] = [None] * len(self.layers)
        self._natural: list[torch.Tensor | None] = [None] * len(self.layers)
        self._hit_ever: set[int] = set()
        self._hit_forward: set[int] = set()
        self.num_forwards = 0
        self._handles: list = []
        # Gradient checkpointing recomputes MoE blocks during backward: that must happen inside the context.
        self._checkpointing = any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
        self._awaiting_recompute = False
        self.recomputed = 0

    # -- hooks -----------------------------------------------------------------------------------------------
    def _install(self) -> None:
        self._handles.append(self.model.register_forward_pre_hook(self._model_pre))
        self._handles.append(self.model.register_forward_hook(self._model_post))
        for layer in self.layers:
            self._handles.append(layer.block.register_forward_pre_hook(self._block_hook(layer.slot)))
            self._handles.append(layer.router.register_forward_hook(self._router_hook(layer)))

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _model_pre(self, module, args):
        self._hit_forward = set()  # a forward that raised midway left stale hits: every forward starts afresh
        # Reentrant checkpointing runs the layers under no_grad, so the grad mode is read here, at the top.
        if self._checkpointing and module.training and torch.is_grad_enabled() and not in_backward():
            self._awaiting_recompute = True

    def _model_post(self, module, args, output):
        self.num_forwards += 1
        if len(self._hit_forward) < len(self.layers):
            missed = [layer.layer_index for layer in self.layers if layer.slot not in self._hit_forward]
            raise RoutingError(
                f"replay did not take effect: a forward of {type(module).__name__} hit "
                f"{len(self._hit_forward)} of the {len(self.layers)} MoE layers the routes hold "
                f"(missed decoder layers {missed})"
            )

    def _block_hook(self, slot: int):
        def hook(module, args):
            self._shape[slot] = block_shape(args)

        return hook

    def _router_hook(self, layer: MoeLayer):
        slot = layer.slot

        def hook(module, args, output):
            logits, _, natural = output[0], output[1], output[2]
            shape = self._shape[slot]
            tokens = logits.shape[0]
            matches = shape == self.batch_shape if shape is not None and len(shape) == 2 else None
            if matches is False or tokens != self._forced[slot].shape[0]:
                got = shape if shape is not None else (tokens,)
                raise RoutingError(
                    f"routes are for [B, S] = {list(self.batch_shape)} but MoE layer {layer.layer_index} got input "
                    f"{list(got)}: pass the rows of this forward (routes[rows]) padded exactly like its input_ids"
                )
            forced = self._forced[slot]
            free = self._free[slot]
            if free is not None:
                forced = torch.where(free[:, None], natural, forced)
            weights = layer.family.gate_weights(module, logits, forced)
            if in_backward():
                self.recomputed += 1
            else:
                self._natural[slot] = natural.detach()
                self._hit_forward.add(slot)
                if self._checkpointing and module.training and torch.is_grad_enabled():
                    self._awaiting_recompute = True
            self._hit_ever.add(slot)
            return (logits, weights, forced, *output[3:])

        return hook

    def __enter__(self) -> Replay:
        self._install()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._remove()
        if exc_type is None and len(self._hit_ever) < len(self.layers):
            if not self._hit_ever:
                raise RoutingError(
                    f"replay did not take effect: no forward inside the context reached the MoE layers of "
                    f"{type(self.model).__name__} (was the forward run on a different model object?)"
                )
            missed = [layer.layer_index for layer in self.layers if layer.slot not in self._hit_ever]
            raise RoutingError(f"replay did not take effect on MoE decoder layers {missed}")
        if exc_type is None and self._awaiting_recompute and not self.recomputed:
            raise RoutingError(
                "gradient checkpointing is on and a forward with grad ran under replay, but no backward ran inside "
                "the context: backward recomputes the MoE layers and must replay the same routes. Call "
                "loss.backward() inside `with replay(...)` (or turn gradient checkpointing off)"
            )

    # -- results ---------------------------------------------------------------------------------------------
    @property
    def layers_hit(self) -> int:
        """Number of distinct MoE layers whose routing was forced inside the context."""
        return len(self._hit_ever)

    @property
    def natural_routes(self) -> torch.Tensor:
        """Long ``[B, S, L_moe, k]``: the ids the current routers chose on their own in the last forward."""
        if any(n is None for n in self._natural):
            raise RoutingError("natural_routes: no complete forward has run inside the replay context yet")
        b, s = self.batch_shape
        return torch.stack([n.reshape(b, s, -1).to(self.routes.device) for n in self._natural], dim=2)

    def drift(self, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """:func:`~pgzoo.routing.drift.routing_drift` between the replayed and the natural routes."""
        from pgzoo.routing.drift import routing_drift

        return routing_drift(self.routes, self.natural_routes, mask)


def replay(model: torch.nn.Module, routes: torch.Tensor, *, check: bool = True) -> Replay:
    """Context manager forcing ``routes`` on every MoE layer of ``model`` for each forward inside it.

    Args:
        model: the transformers MoE model to run (the object you call inside the context, or its inner model).
        routes: integer ``[B, S, L_moe, k]`` expert ids (:func:`pgzoo.routing.record`'s layout); -1 marks a
            slot the router may choose itself. ``[B, S]`` must equal every forward's input shape.
        check: validate ids (range, duplicates, degenerate routes) on entry: one host sync. Leave on.

    Example:
        >>> with pgzoo.routing.record(model) as rec, torch.no_grad():
        ...     old = model(ids, attention_mask=am).logits
        >>> with pgzoo.routing.replay(model, rec.routes):
        ...     new = model(ids, attention_mask=am).logits      # same experts as `old`, router keeps its gradient

    Raises:
        RoutingError: see the module docstring.
    """
    return Replay(model, routes, check=check)
