"""What a rollout engine declares it can do, read without building it: recipe checks and the contract suite ask this.

    class MyEngine: capabilities = EngineCapabilities(dtypes=("float32", "bfloat16"), lora_sync=True)

    @pgzoo.rollout.builders.engines.register("my-engine")
    @declare(MyEngine.capabilities)                          # the builder carries the engine's declaration
    def build(rollout, model_path, *, seed, return_routes, world_size=1): ...

    pgzoo.rollout.builders.capabilities_of("vllm").routes_here()     # asked by name, no engine started

A recipe is checked against the declaration of its ``rollout.engine`` (:meth:`pgzoo.recipes.Recipe.check`), so a
check never has to start an engine (starting vLLM takes tens of seconds) and never names an engine: a third engine
that declares FP8 rollouts validates with ``rollout.fp8: true`` like the built-in ones.
``tests/test_engine_contract.py`` holds every registered engine to its declaration (the float32 logprob tolerance,
routes, syncs, seeds, close).

A builder that declares nothing gets :data:`UNDECLARED`: float32 rollouts with plain ``load_weights(model)`` and
nothing else (no routes, FP8, router dtype, LoRA or sharded sync), so a recipe asking more of it is rejected with the
fix (declare what the engine can do) instead of failing, or silently doing something else, mid-run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

from pgzoo.errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16")

F = TypeVar("F", bound=Callable[..., Any])


@dataclasses.dataclass(frozen=True)
class EngineCapabilities:
    """One engine's declared abilities: each field is a recipe setting the engine can honour (or a guarantee).

    Attributes:
        dtypes: the ``rollout.dtype`` values the engine samples in.
        fp8: FP8 (e4m3) rollout weights (``rollout.fp8``).
        fp8_dtypes: the ``rollout.dtype`` values FP8 rollouts run in (the activation dtype beside FP8 weights).
        fp8_needs_cuda: FP8 only on a CUDA device (vLLM's FP8 kernels; its CPU build has none).
        router_dtype: a separate dtype for the MoE routers' logits (``rollout.router_dtype``).
        routes: ``generate(..., return_routes=True)`` returns the experts each token was routed to (R3,
            ``train.routing_replay: R3``), given the device below.
        routes_need_cuda: routes only on a CUDA device (vLLM returns routed experts from its Model Runner V2, which
            runs on GPUs only).
        lora_sync: ``load_weights`` / ``sync_weights`` take a PEFT LoRA policy and sync its effective weights
            (``model.lora``).
        sharded_sync: the engine takes ``load_weight_buckets(buckets)``, the streamed sync of an FSDP2-sharded policy
            (``train.strategy: fsdp``).
        background_generate: ``generate`` may run in a background thread while the trainer updates its own copy of
            the policy, with ``load_weights`` called only between generations (``rollout.max_staleness`` >= 1): the
            engine samples from weights of its own, never from the trainer's module. The registered builder builds
            it that way when the recipe is asynchronous (vLLM: its engine core in a process of its own); an engine
            object built otherwise says so through an optional ``check_background_generate()``, which the trainer
            calls (raising :class:`~pgzoo.errors.ConfigError`).
        device_choice: the builder places the engine on ``rollout.device`` (e.g. ``cuda:1``), a device apart from
            the trainer's.
        weight_transfer: the backends of vLLM's weight-transfer API the engine can receive its syncs through
            (``rollout.weight_transfer``; ``"nccl"``: the trainer's CUDA tensors broadcast to the engine's workers).
            Always a CUDA path.
        logprob_tolerance: the mean |log μ − log π| the engine keeps in float32 against the policy's own logprobs on
            the same tokens, fresh and after a sync (what ``rollout.verify_sync`` should be at least; the contract
            suite checks it).
        notes: ``(field, why)`` pairs explaining a missing ability, quoted in the recipe error.
    """

    dtypes: tuple[str, ...] = ("float32",)
    fp8: bool = False
    fp8_dtypes: tuple[str, ...] = ()
    fp8_needs_cuda: bool = False
    router_dtype: bool = False
    routes: bool = False
    routes_need_cuda: bool = False
    lora_sync: bool = False
    sharded_sync: bool = False
    background_generate: bool = False
    device_choice: bool = False
    weight_transfer: tuple[str, ...] = ()
    logprob_tolerance: float = 1e-4
    notes: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        # A declaration is read by every recipe check: reject a malformed one where it is written, by field.
        for field in ("dtypes", "fp8_dtypes"):
            value = getattr(self, field)
            if not isinstance(value, tuple) or any(d not in DTYPES for d in value):
                raise ConfigError(f"EngineCapabilities.{field}={value!r}: a tuple of {', '.join(DTYPES)}")
        if not (isinstance(self.weight_transfer, tuple) and all(isinstance(b, str) for b in self.weight_transfer)):
            raise ConfigError(f"EngineCapabilities.weight_transfer={self.weight_transfer!r}: a tuple of backend names, "
                              "e.g. ('nccl',)")
        if not self.dtypes:
            raise ConfigError("EngineCapabilities.dtypes is empty: an engine samples in at least one dtype")
        if self.fp8 and not self.fp8_dtypes:
            raise ConfigError("EngineCapabilities(fp8=True) needs fp8_dtypes: the rollout.dtype values FP8 runs in")
        if not self.fp8 and self.fp8_dtypes:
            raise ConfigError("EngineCapabilities.fp8_dtypes is set but fp8=False; drop fp8_dtypes or set fp8=True")
        if self.fp8_needs_cuda and not self.fp8:
            raise ConfigError("EngineCapabilities(fp8_needs_cuda=True) needs fp8=True")
        if self.routes_need_cuda and not self.routes:
            raise ConfigError("EngineCapabilities(routes_need_cuda=True) needs routes=True")
        if not (isinstance(self.logprob_tolerance, (int, float)) and self.logprob_tolerance > 0):
            raise ConfigError(f"EngineCapabilities.logprob_tolerance={self.logprob_tolerance!r} must be > 0")
        fields = {f.name for f in dataclasses.fields(self)}
        for pair in self.notes:
            if not (isinstance(pair, tuple) and len(pair) == 2 and pair[0] in fields and isinstance(pair[1], str)):
                raise ConfigError(f"EngineCapabilities.notes: {pair!r} is not a (field name, reason) pair")

    def fp8_here(self, cuda: bool | None = None) -> bool:
        """Whether FP8 rollouts run on this machine (``cuda``: whether CUDA is available; default: ask torch)."""
        if not self.fp8:
            return False
        if not self.fp8_needs_cuda:
            return True
        return has_cuda() if cuda is None else cuda

    def routes_here(self, cuda: bool | None = None) -> bool:
        """Whether routes can be returned on this machine (``cuda``: whether CUDA is available; default: ask torch)."""
        if not self.routes:
            return False
        if not self.routes_need_cuda:
            return True
        return has_cuda() if cuda is None else cuda

    def note(self, field: str) -> str:
        """The declared reason ``field`` is missing (empty when none was given)."""
        return dict(self.notes).get(field, "")


# What a builder that declares nothing is trusted with (see the module docstring).
UNDECLARED = EngineCapabilities()


def has_cuda() -> bool:
    """Whether this process sees a CUDA device (the device-dependent capabilities ask this; tests patch it)."""
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # pragma: no cover - a broken torch install: no CUDA to use either
        return False


def declare(capabilities: EngineCapabilities) -> Callable[[F], F]:
    """Attach ``capabilities`` to a builder function (``build.capabilities``), where recipe checks read it.

    A builder that is the engine class itself needs no decorator: its class attribute ``capabilities`` is read.
    """
    if not isinstance(capabilities, EngineCapabilities):
        raise ConfigError(f"declare({capabilities!r}): expected an EngineCapabilities")

    def attach(builder: F) -> F:
        builder.capabilities = capabilities  # type: ignore[attr-defined]
        return builder

    return attach


__all__ = ["DTYPES", "EngineCapabilities", "UNDECLARED", "declare", "has_cuda"]
