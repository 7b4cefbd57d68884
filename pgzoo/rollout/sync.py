"""Streaming weight sync: from a trainer's policy — plain, FSDP2-sharded or PEFT LoRA — into a rollout engine,
parameter by parameter, in bounded buckets.

    from pgzoo.rollout.sync import sync_weights
    stats = sync_weights(policy, engine, bucket_mb=256)     # on every rank; engine=None on a rank without one

What flows, in the base model's ``state_dict`` order, one source parameter at a time:

1. **gather**: a DTensor shard (FSDP2 ``fully_shard``) becomes the full parameter with ``full_tensor()`` — a
   collective, so every rank of the mesh walks the same parameters in the same order (ranks without an engine
   pass ``engine=None`` and discard what they gather);
2. **LoRA**: for a PEFT model, W_eff = W + Σ (α/r)·B·A of the modules the adapters target, into a new tensor
   (:mod:`pgzoo.rollout.lora`; the trainable model is never changed or copied);
3. **names**: the engine's naming — ``"module"`` (the transformers module's own names, fused MoE experts as in
   ``state_dict``) or ``"checkpoint"`` (what ``save_pretrained`` writes and vLLM loads: per-expert tensors),
   converted with the reverse of transformers' own loading conversion (``revert_weight_conversion``);
4. **buckets**: tensors are grouped into lists of at most ``bucket_mb`` (a parameter is never split: one larger
   than the bucket travels alone); the bucket is closed *before* the next parameter is gathered, and handed to
   ``engine.load_weight_buckets``, which consumes the buckets one by one and lets each go before asking for the
   next.

So no rank ever holds a full state dict: the sync's extra memory on a rank is at most one bucket, or one gathered
parameter (twice its size while transformers converts a fused expert tensor to per-expert names) when that is
larger. Before any tensor moves, the names and shapes (computed on the meta device) are checked against the engine
and every floating tensor's local shard is checked for NaN/Inf; the verdict is agreed across ranks, so a refused
sync raises on every rank and the engine keeps its previous weights.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from pgzoo.errors import ConfigError, EngineError
from pgzoo.rollout.base import unwrap
from pgzoo.rollout.lora import Source, is_peft_model, peft_sources, plain_sources

NAMES = ("module", "checkpoint")
DEFAULT_BUCKET_MB = 256.0
Bucket = list[tuple[str, torch.Tensor]]


@dataclass(frozen=True)
class SyncStats:
    """What one :func:`sync_weights` moved: wall ``seconds``, ``tensors`` and their ``bytes``, the number of
    ``buckets``, the largest bucket (``max_bucket_bytes``), the bucket limit (``bucket_bytes``), and the largest
    single source parameter as gathered (``max_param_bytes``, the floor of any bucket bound)."""

    seconds: float
    tensors: int
    bytes: int
    buckets: int
    max_bucket_bytes: int
    bucket_bytes: int
    max_param_bytes: int


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


def _full(t: torch.Tensor) -> torch.Tensor:
    """The full tensor (collective for a DTensor), detached; the model's own storage when it is not sharded."""
    t = t.detach()
    return t.full_tensor() if _is_dtensor(t) else t


def _local(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t.to_local() if _is_dtensor(t) else t


def _sources(model: torch.nn.Module, adapters: bool = True) -> tuple[torch.nn.Module, list[Source]]:
    if not isinstance(model, torch.nn.Module):
        raise EngineError(f"weight sync expects a torch.nn.Module (the policy), got {type(model).__name__}")
    model = unwrap(model)
    if is_peft_model(model):
        return peft_sources(model, adapters=adapters)
    return model, plain_sources(model)


# -- names: module (state_dict) or checkpoint (save_pretrained / vLLM) ------------------------------------------
_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _renames(base: torch.nn.Module, sources: list[Source]) -> dict[str, list[tuple[str, tuple, torch.dtype]]]:
    """Per source name, the checkpoint names, shapes and dtypes it becomes (identity for most tensors), computed on
    meta tensors and cached per model while its names and shapes stay the same."""
    key = tuple((s.name, tuple(s.tensor.shape), s.tensor.dtype) for s in sources)
    cached = _PLANS.get(base)
    if cached is not None and cached[0] == key:
        return cached[1]
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers < 5: state dicts already use checkpoint names
        revert_weight_conversion = None
    out = {}
    for name, shape, dtype in key:
        if revert_weight_conversion is None:
            out[name] = [(name, shape, dtype)]
            continue
        meta = revert_weight_conversion(base, {name: torch.empty(shape, dtype=dtype, device="meta")})
        out[name] = [(k, tuple(v.shape), v.dtype) for k, v in meta.items()]
    _PLANS[base] = (key, out)
    return out


def sync_plan(model: torch.nn.Module, names: str = "checkpoint") -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """``[(name, shape, dtype)]`` that :func:`iter_sync_tensors` yields, in order, without gathering or copying
    anything (shapes of DTensors are global)."""
    _check_names(names)
    base, sources = _sources(model)
    if names == "module":
        return [(s.name, tuple(s.tensor.shape), s.tensor.dtype) for s in sources]
    renames = _renames(base, sources)
    return [entry for s in sources for entry in renames[s.name]]


def _check_names(names: str) -> None:
    if names not in NAMES:
        raise ConfigError(f"names={names!r}: choose 'module' (the model's state_dict names) or 'checkpoint' "
                          f"(save_pretrained's names, e.g. per-expert MoE weights)")


def _groups(model: torch.nn.Module, names: str, adapters: bool = True):
    """Yield ``(nbytes, fetch)`` per source parameter; ``fetch()`` gathers, merges and renames it into a list of
    ``(name, tensor)`` (collective under FSDP: call it for every group on every rank, in order)."""
    base, sources = _sources(model, adapters)
    renames = _renames(base, sources) if names == "checkpoint" else None

    def fetch(src: Source) -> Bucket:
        with torch.no_grad():
            value = _full(src.tensor)
            for delta in src.deltas:  # W + s*B*A into a new tensor: never in place on the model's weight
                value = value + _full(delta()).to(value.dtype)
        if renames is None or renames[src.name] == [(src.name, tuple(value.shape), value.dtype)]:
            return [(src.name, value)]
        from transformers.core_model_loading import revert_weight_conversion

        converted = revert_weight_conversion(base, {src.name: value})
        del value  # the gathered tensor goes as soon as transformers has split it
        return list(converted.items())

    for src in sources:
        numel = 1
        for d in src.tensor.shape:
            numel *= d
        yield numel * src.tensor.element_size(), (lambda s=src: fetch(s))


def iter_sync_tensors(model: torch.nn.Module, names: str = "checkpoint", *, adapters: bool = True
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of everything an engine needs, one source parameter at a time (see the module docstring).

    Tensors of a plain, unsharded model are the model's own (detached, not copied): do not write into them. Under
    FSDP2 this is collective: every rank must exhaust the iterator. ``adapters=False`` leaves PEFT LoRA deltas out
    (the base weights).
    """
    _check_names(names)
    for _, fetch in _groups(model, names, adapters):
        yield from fetch()


def iter_sync_buckets(model: torch.nn.Module, bucket_mb: float = DEFAULT_BUCKET_MB, names: str = "checkpoint", *,
                      adapters: bool = True, _stats: dict | None = None) -> Iterator[Bucket]:
    """:func:`iter_sync_tensors` grouped into lists of at most ``bucket_mb`` megabytes (2**20 bytes); a parameter
    larger than that forms a bucket of its own. Each bucket is released by this generator before the next parameter
    is gathered: keep no reference to it after processing."""
    _check_names(names)
    limit = _bucket_bytes(bucket_mb)
    stats = _stats if _stats is not None else {}
    stats.update(tensors=0, bytes=0, buckets=0, max_bucket_bytes=0, max_param_bytes=0, bucket_bytes=limit)
    bucket: Bucket = []
    size = 0
    for nbytes, fetch in _groups(model, names, adapters):
        if bucket and size + nbytes > limit:
            stats["buckets"] += 1
            stats["max_bucket_bytes"] = max(stats["max_bucket_bytes"], size)
            yield bucket
            bucket, size = [], 0  # released before the next gather
        tensors = fetch()
        got = sum(t.numel() * t.element_size() for _, t in tensors)
        stats["max_param_bytes"] = max(stats["max_param_bytes"], got)
        stats["tensors"] += len(tensors)
        stats["bytes"] += got
        bucket.extend(tensors)
        size += got
        del tensors
    if bucket:
        stats["buckets"] += 1
        stats["max_bucket_bytes"] = max(stats["max_bucket_bytes"], size)
        yield bucket


def _bucket_bytes(bucket_mb) -> int:
    if isinstance(bucket_mb, bool) or not isinstance(bucket_mb, (int, float)) or not bucket_mb > 0:
        raise ConfigError(f"bucket_mb={bucket_mb!r}: give a positive number of megabytes per weight-sync bucket "
                          f"(rollout.sync_bucket_mb), e.g. 256")
    return max(1, int(bucket_mb * 2**20))


# -- the sync -------------------------------------------------------------------------------------------------
def _distributed(model: torch.nn.Module) -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and any(_is_dtensor(p) for p in unwrap(model).parameters())


def _preflight(model: torch.nn.Module, engine, names: str, distributed: bool) -> None:
    """Check names/shapes against the engine and every floating tensor for NaN/Inf (local shards), agree on the
    verdict across ranks, and raise on every rank if any rank refuses."""
    problem: EngineError | None = None
    if engine is not None and not callable(getattr(engine, "load_weight_buckets", None)):
        problem = EngineError(f"{type(engine).__name__} has no load_weight_buckets(buckets): streaming weight sync "
                              f"needs a pgzoo engine (VLLMEngine, TransformersEngine) or one with that method")
    elif engine is not None and hasattr(engine, "check_sync_plan"):
        try:
            engine.check_sync_plan(sync_plan(model, names))
        except EngineError as exc:
            problem = exc
    tensors = [(n, _local(t)) for n, t in unwrap(model).state_dict(keep_vars=True).items() if t.is_floating_point()]
    if problem is None and tensors:
        ok = torch.stack([torch.isfinite(t).all() for _, t in tensors]).cpu()
        if not bool(ok.all()):
            bad = [n for (n, _), good in zip(tensors, ok.tolist()) if not good]
            problem = EngineError(
                f"refusing to sync non-finite weights: NaN/Inf in {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}"
                f". The engine keeps its previous weights; lower the learning rate or enable gradient clipping")
    if distributed:
        import torch.distributed as dist

        device = next(t for t in unwrap(model).parameters() if _is_dtensor(t)).device_mesh.device_type
        flag = torch.tensor([0 if problem is None else 1], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if problem is None and int(flag.item()):
            problem = EngineError("weight sync refused on another rank (non-finite weights or a name/shape mismatch "
                                  "there; see that rank's error). The engine keeps its previous weights")
    if problem is not None:
        raise problem


def sync_weights(model: torch.nn.Module, engine, *, bucket_mb: float = DEFAULT_BUCKET_MB,
                 adapters: bool = True) -> SyncStats:
    """Stream ``model``'s current weights into ``engine`` (``engine.load_weight_buckets``) in buckets of at most
    ``bucket_mb`` megabytes; returns :class:`SyncStats`.

    Call it on every rank when the model is sharded (FSDP2): gathering is collective. ``engine=None`` on a rank
    without an engine gathers and discards. ``adapters=False`` syncs a PEFT model's base weights.

    Raises:
        EngineError: NaN/Inf in the weights, or names/shapes the engine does not have (checked before anything
            moves: the engine keeps its previous weights); an engine failure mid-stream (other ranks still finish
            their collectives before it is raised).
    """
    return prepare_sync(model, engine, bucket_mb=bucket_mb, adapters=adapters)()


def prepare_sync(model: torch.nn.Module, engine, *, bucket_mb: float = DEFAULT_BUCKET_MB,
                 adapters: bool = True) -> Callable[[], SyncStats]:
    """The checks of :func:`sync_weights` now (arguments, names/shapes against the engine, NaN/Inf: the same errors,
    raised here), and the stream as a callable that moves the weights when called; ``sync_weights`` is
    ``prepare_sync(...)()``.

    The stream reads the model's parameters as they are when it runs, so it may run in another thread while the
    caller computes (a forward, a backward) as long as no parameter changes before it returns: the caller waits for
    it before the next optimizer step. Under FSDP2 the stream is collective (call it on every rank, in the thread
    that runs the other collectives).
    """
    start = time.perf_counter()
    if not isinstance(model, torch.nn.Module):
        raise EngineError(f"weight sync expects a torch.nn.Module (the policy), got {type(model).__name__}")
    names = getattr(engine, "sync_names", "checkpoint") if engine is not None else "checkpoint"
    _bucket_bytes(bucket_mb)
    distributed = _distributed(model)
    _preflight(model, engine, names, distributed)
    checked = time.perf_counter() - start

    def stream() -> SyncStats:
        began = time.perf_counter()
        stats: dict = {}
        buckets = iter_sync_buckets(model, bucket_mb, names, adapters=adapters, _stats=stats)
        try:
            if engine is None:
                for _ in buckets:
                    pass
            else:
                engine.load_weight_buckets(buckets)
        except BaseException:
            if distributed:  # keep in step with the other ranks' gathers before raising
                for _ in buckets:
                    pass
            raise
        finally:
            buckets.close()
        return SyncStats(seconds=checked + time.perf_counter() - began, tensors=stats["tensors"],
                         bytes=stats["bytes"], buckets=stats["buckets"], max_bucket_bytes=stats["max_bucket_bytes"],
                         bucket_bytes=stats["bucket_bytes"], max_param_bytes=stats["max_param_bytes"])

    return stream
