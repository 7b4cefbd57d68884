"""MoE routing record and replay (R2, R3) for Hugging Face transformers models (docs/design.md §6).

    import pgzoo.routing as routing
    with routing.record(model) as rec:              # Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE
        model(input_ids, attention_mask=am)         # or model.generate(...)
    routes = rec.routes                             # long [B, S, L_moe, k]
    with routing.replay(model, routes) as rp:       # expert ids forced, gate weights from the current router
        out = model(input_ids, attention_mask=am)
    routing.routing_drift(routes, rp.natural_routes, mask=am)   # share of tokens whose expert set changed

Trainers drive :class:`RoutingReplay` (mode "R2", "R3" or None); see docs/routing.md.
"""

from pgzoo.routing.drift import drift_counts, drift_from_counts, routing_drift
from pgzoo.routing.families import FAMILIES, SUPPORTED, MoeLayer, find_moe_layers
from pgzoo.routing.record import UNROUTED, Recording, record
from pgzoo.routing.replay import Replay, check_routes, replay
from pgzoo.routing.trainer import MODES, RoutingReplay, parse_mode

__all__ = [
    "record",
    "replay",
    "routing_drift",
    "drift_counts",
    "drift_from_counts",
    "RoutingReplay",
    "parse_mode",
    "MODES",
    "Recording",
    "Replay",
    "check_routes",
    "find_moe_layers",
    "MoeLayer",
    "FAMILIES",
    "SUPPORTED",
    "UNROUTED",
]
