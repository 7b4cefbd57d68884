"""pgzoo: pluggable, comparable and correct policy-gradient objectives for LLM reinforcement learning.

    import pgzoo
    out = pgzoo.get("minirl")(pgzoo.TokenBatch(logprobs=..., mask=..., advantages=..., rollout_logprobs=...))
    out.loss.backward()

The core (this package minus ``pgzoo.rollout.vllm_engine`` and the adapters) imports with torch alone.
"""

from pgzoo.batch import TokenBatch
from pgzoo.errors import (
    BatchError,
    ConfigError,
    DependencyError,
    EngineError,
    PgzooError,
    RoutingError,
    UnknownNameError,
)
from pgzoo.objectives.base import Objective, ObjectiveOutput, aggregate
from pgzoo.registry import available, get, register, unregister
from pgzoo import advantages, correction, diagnostics, testing  # noqa: E402  (torch-only submodules)
from pgzoo.correction import Correction

__version__ = "0.1.0"

__all__ = [
    "TokenBatch",
    "Objective",
    "ObjectiveOutput",
    "aggregate",
    "Correction",
    "advantages",
    "correction",
    "diagnostics",
    "testing",
    "get",
    "register",
    "unregister",
    "available",
    "PgzooError",
    "BatchError",
    "ConfigError",
    "UnknownNameError",
    "DependencyError",
    "EngineError",
    "RoutingError",
]
