"""RoutingReplay: R2 / R3 for a training loop, with layers-hit and routing-drift metrics.

One object per run; per rollout batch of N rows::

    rr = RoutingReplay("R2")                          # "R2", "R3" or None (off: every call is a no-op)
    rr.start_batch(rollouts.routes)                   # new batch; R3 needs the rollout routes [N, S, L, k]
    with torch.no_grad(), rr.old_pass(model, rows=chunk, mask=am[chunk]):
        old_logits = model(ids[chunk], attention_mask=am[chunk]).logits    # θ_old in the training engine
    for mb in minibatches:                            # any row order, any chunking
        with rr.update_pass(model, rows=mb, mask=am[mb]):
            loss = objective(...model(ids[mb], attention_mask=am[mb])...).loss
            loss.backward()                           # inside: gradient checkpointing recomputes under replay
    log(rr.metrics())                                 # routing/* tensors

=========  ===============================================  ==================================================
mode       ``old_pass`` (θ_old logprobs, training engine)   ``update_pass`` (every update of the batch)
=========  ===============================================  ==================================================
``R2``     records the training engine's routes per row     replays the recorded routes of those rows
``R3``     replays the rollout engine's routes              replays the rollout engine's routes
``None``   nothing                                          nothing
=========  ===============================================  ==================================================

``rows`` says which rows of the batch a forward holds: ``None`` (all, in order), a slice, a list or a long
tensor of row indices. Old pass and update passes may chunk and order rows differently (TRL computes old
logprobs in chunks of ``per_device_train_batch_size`` and the loss over shuffled splits); each row keeps its own
routes. Routes are stored as int16 (N·S·L·k·2 bytes) and widened per forward.

Metrics (detached tensors, accumulated since :meth:`start_batch`; keys prefixed ``routing/``):

- ``layers_hit``: fewest MoE layers forced in any pass (equals ``num_moe_layers`` when replay works);
- ``num_moe_layers``;
- ``drift_rollout``, ``drift_rollout_any_layer``, ``drift_rollout_layer_{i}``, ``expert_overlap_rollout``: share of
  (token, layer) slots whose expert set differs between the training engine at θ_old and the rollout's routes (old
  pass; needs rollout routes; what R3 removes). R2 compares the training engine's free-running routing; R3, which
  forces the rollout routes, compares per layer what the training router would pick on the replayed forward's
  hidden states (the same at layer 0; deeper layers see identical inputs, so it isolates router disagreement);
- ``drift_update``, ``drift_update_any_layer``, ``drift_update_layer_{i}``, ``expert_overlap_update``: share of
  slots where the current router (θ), on the replayed forward's hidden states, would choose a different expert set
  than the replayed one (update passes; R2: θ vs θ_old, what R2 removes; R3: θ vs rollout).

Masks passed to the passes select the positions that count (use the attention mask, or prompt + completion);
positions holding UNROUTED (-1) never count.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from pgzoo.errors import ConfigError, RoutingError
from pgzoo.routing.drift import drift_counts, drift_from_counts
from pgzoo.routing.record import UNROUTED, record
from pgzoo.routing.replay import replay

MODES = ("R2", "R3", None)
Rows = slice | Sequence[int] | torch.Tensor | None


def parse_mode(mode: str | None) -> str | None:
    """Normalise a routing-replay mode: "R2"/"r2", "R3"/"r3", or None/"none"/"off"/"" (disabled)."""
    if mode is None or (isinstance(mode, str) and mode.strip().lower() in ("", "none", "off", "false")):
        return None
    if isinstance(mode, str) and mode.strip().upper() in ("R2", "R3"):
        return mode.strip().upper()
    raise ConfigError(f"routing_replay mode {mode!r} is not one of 'R2', 'R3' or None (off)")


class RoutingReplay:
    """Routing replay for a trainer (see the module docstring for the protocol and metrics).

    Args:
        mode: "R2" (replay the training engine's θ_old routes), "R3" (replay the rollout engine's routes) or
            None (off).
    """

    def __init__(self, mode: str | None = None):
        self.mode = parse_mode(mode)
        self._routes: torch.Tensor | None = None  # int16 [N, S, L, k], UNROUTED where not captured
        self._rollout: torch.Tensor | None = None
        self._captured: torch.Tensor | None = None  # bool [N]
        self._counts: dict[str, dict[str, torch.Tensor]] = {}
        self._layers_hit: int | None = None
        self._num_layers: int | None = None

    @property
    def enabled(self) -> bool:
        return self.mode is not None

    @property
    def needs_rollout_routes(self) -> bool:
        """True for R3: ask the rollout engine for routes (``generate(..., return_routes=True)``)."""
        return self.mode == "R3"

    # -- batch lifecycle -------------------------------------------------------------------------------------
    def start_batch(self, rollout_routes: torch.Tensor | None = None, *,
                    recorded_routes: torch.Tensor | None = None) -> None:
        """Begin a new rollout batch: forget stored routes and metrics.

        Args:
            rollout_routes: ``[N, S, L_moe, k]`` routes from the rollout engine, aligned to the rows and
                positions the trainer will feed (prompt + completion). Required for R3; with R2 they are only
                used to measure ``drift_rollout``.
            recorded_routes: R2 only: ``[N, S, L_moe, k]`` routes an earlier :meth:`old_pass` recorded for these rows
                (``.routes`` of the replay that ran it; e.g. under the weights that sampled the rows, before they
                changed); the update passes replay them and no old pass is needed for this batch.
        """
        if recorded_routes is not None and self.mode != "R2":
            raise ConfigError(f"recorded_routes are R2's (routes of an earlier old pass); this replay is {self.mode}")
        if self.mode == "R3" and rollout_routes is None:
            raise ConfigError(
                "routing_replay='R3' needs the rollout engine's routes: generate with return_routes=True and pass "
                "rollouts.routes to start_batch (or use 'R2')"
            )
        if rollout_routes is not None and (not isinstance(rollout_routes, torch.Tensor) or rollout_routes.dim() != 4):
            raise RoutingError(
                f"rollout_routes must be a [N, S, L_moe, k] tensor, got "
                f"{tuple(rollout_routes.shape) if isinstance(rollout_routes, torch.Tensor) else type(rollout_routes)}"
            )
        self._rollout = rollout_routes
        self._routes = recorded_routes
        self._captured = (None if recorded_routes is None
                          else torch.ones(recorded_routes.shape[0], dtype=torch.bool))
        self._counts = {}
        self._layers_hit = None

    # -- passes ----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def old_pass(self, model: torch.nn.Module, rows: Rows = None, mask: torch.Tensor | None = None) -> Iterator:
        """Context for the θ_old forward over ``rows``: R2 records, R3 replays the rollout routes, None: nothing.

        ``mask`` ``[B, S]`` (optional) selects the positions counted in drift metrics (e.g. the attention mask).
        """
        if self.mode is None:
            yield None
            return
        if self.mode == "R3":
            with self.update_pass(model, rows=rows, mask=mask, _key="rollout") as rp:
                yield rp
            return
        with record(model) as rec:
            yield rec
        self._note_layers(rec.layers_hit, rec.num_layers)
        routes = rec.routes
        self._store(rows, routes)
        if self._rollout is not None:
            self._accumulate("rollout", self._select(self._rollout, rows, routes.shape[0]), routes, mask)

    @contextlib.contextmanager
    def update_pass(
        self,
        model: torch.nn.Module,
        rows: Rows = None,
        mask: torch.Tensor | None = None,
        *,
        routes: torch.Tensor | None = None,
        _key: str = "update",
    ) -> Iterator:
        """Context for a forward (and its backward) over ``rows`` that replays their stored routes.

        Pass ``routes`` instead of ``rows`` when the trainer carries the routes with its batch (e.g. as a tensor
        field that TRL shuffles and splits with the other fields). Run backward inside the context when gradient
        checkpointing is on.
        """
        if self.mode is None:
            yield None
            return
        if routes is None:
            routes = self.routes_for(rows)
        with replay(model, routes) as rp:
            yield rp
        self._note_layers(rp.layers_hit, len(rp.layers))
        self._accumulate(_key, routes, rp.natural_routes, mask)

    def routes_for(self, rows: Rows = None) -> torch.Tensor:
        """Long ``[len(rows), S, L, k]`` routes of ``rows`` (R2: captured in the old pass; R3: the rollout's)."""
        if self.mode is None:
            raise RoutingError("routes_for: routing replay is off (mode None)")
        source = self._rollout if self.mode == "R3" else self._routes
        if source is None:
            raise RoutingError(
                "no routes stored for this batch: R2 replays what old_pass recorded (run the θ_old forward inside "
                "rr.old_pass(model, rows=...) first); R3 needs start_batch(rollout_routes)"
            )
        if self.mode == "R2" and not isinstance(rows, slice) and rows is not None:
            index = torch.as_tensor(rows).reshape(-1).long().cpu()
            known = index < len(self._captured)
            captured = known.clone()
            captured[known] = self._captured[index[known]]
            if not bool(captured.all()):
                missing = index[~captured]
                raise RoutingError(f"rows {missing[:8].tolist()} have no routes: they were not in any old_pass")
        return self._select(source, rows, None).long()

    @property
    def routes(self) -> torch.Tensor | None:
        """All stored routes of the batch (R2: recorded, int16, -1 where not captured; R3: the rollout's)."""
        return self._rollout if self.mode == "R3" else self._routes

    # -- metrics ---------------------------------------------------------------------------------------------
    def metrics(self, prefix: str = "routing/") -> dict[str, torch.Tensor]:
        """Detached metric tensors accumulated since :meth:`start_batch` (empty when off)."""
        if self.mode is None:
            return {}
        out: dict[str, torch.Tensor] = {}
        if self._layers_hit is not None:
            out[f"{prefix}layers_hit"] = torch.tensor(float(self._layers_hit))
            out[f"{prefix}num_moe_layers"] = torch.tensor(float(self._num_layers))
        for key, counts in self._counts.items():
            for name, value in drift_from_counts(counts).items():
                if name == "num_slots":
                    continue
                if name.startswith("drift_layer_"):
                    out[f"{prefix}drift_{key}_layer_{name[len('drift_layer_'):]}"] = value
                elif name == "drift":
                    out[f"{prefix}drift_{key}"] = value
                elif name == "drift_any_layer":
                    out[f"{prefix}drift_{key}_any_layer"] = value
                else:
                    out[f"{prefix}{name}_{key}"] = value
        return out

    # -- internals -------------------------------------------------------------------------------------------
    def _note_layers(self, hit: int, total: int) -> None:
        self._layers_hit = hit if self._layers_hit is None else min(self._layers_hit, hit)
        self._num_layers = total

    def _accumulate(self, key: str, a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None) -> None:
        counts = drift_counts(a.to(b.device).long(), b, mask)
        if key in self._counts:
            counts = {k: self._counts[key][k] + v for k, v in counts.items()}
        self._counts[key] = counts

    @staticmethod
    def _row_index(rows: Rows, n: int) -> torch.Tensor:
        if rows is None:
            return torch.arange(n)
        if isinstance(rows, slice):
            return torch.arange(n)[rows]
        index = torch.as_tensor(rows).reshape(-1).long().cpu()
        bad = index[(index < 0) | (index >= n)]
        if bad.numel():
            raise RoutingError(f"rows {bad.tolist()[:8]} are outside the batch's {n} rows")
        return index

    def _select(self, source: torch.Tensor, rows: Rows, expect: int | None) -> torch.Tensor:
        index = self._row_index(rows, source.shape[0])
        out = source[index.to(source.device)]
        if expect is not None and out.shape[0] != expect:
            raise RoutingError(f"rows select {out.shape[0]} rows but the forward held {expect}")
        return out

    def _store(self, rows: Rows, routes: torch.Tensor) -> None:
        dtype = torch.int16 if routes.max() < torch.iinfo(torch.int16).max else torch.int32
        if rows is None:
            index = torch.arange(routes.shape[0])
        elif isinstance(rows, slice):
            stop = rows.stop if rows.stop is not None else (rows.start or 0) + routes.shape[0] * (rows.step or 1)
            index = torch.arange(stop)[rows]
        else:
            index = torch.as_tensor(rows).reshape(-1).long().cpu()
        if index.numel() != routes.shape[0]:
            raise RoutingError(f"old_pass rows name {index.numel()} rows but the forward held {routes.shape[0]}")
        if index.numel() and int(index.min()) < 0:
            raise RoutingError("old_pass rows must be non-negative row indices")
        need = int(index.max()) + 1 if index.numel() else 0
        if self._routes is None:
            self._routes = routes.new_full((need, *routes.shape[1:]), UNROUTED, dtype=dtype)
            self._captured = torch.zeros(need, dtype=torch.bool)
        if tuple(self._routes.shape[1:]) != tuple(routes.shape[1:]):
            raise RoutingError(
                f"old_pass forwards disagree on [S, L, k]: {tuple(self._routes.shape[1:])} vs "
                f"{tuple(routes.shape[1:])}; pad every chunk of the batch to the same length"
            )
        if need > self._routes.shape[0]:
            grow = need - self._routes.shape[0]
            self._routes = torch.cat([self._routes, self._routes.new_full((grow, *self._routes.shape[1:]), UNROUTED)])
            self._captured = torch.cat([self._captured, torch.zeros(grow, dtype=torch.bool)])
        self._routes[index.to(self._routes.device)] = routes.to(self._routes.dtype)
        self._captured[index] = True
