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
from pgzoo.objectives.correction import Correction
from pgzoo.objectives.registry import available, get, register, unregister
from pgzoo.version import __version__
from pgzoo import advantages, testing  # noqa: E402  (torch-only submodules, used as pgzoo.advantages.compute, ...)


__all__ = [
    "__version__",
    "TokenBatch",
    "Objective",
    "ObjectiveOutput",
    "aggregate",
    "Correction",
    "advantages",
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
