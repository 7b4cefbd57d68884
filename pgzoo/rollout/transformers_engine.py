"""Rollouts from a Hugging Face model in a chosen precision — the controlled training–inference discrepancy.

    engine = TransformersEngine(policy, dtype="bfloat16")          # a copy of the policy, cast to bf16
    engine = TransformersEngine(policy, fp8=True)                  # weights rounded through FP8 e4m3
    engine = TransformersEngine(policy, router_dtype="bfloat16")   # MoE routers computed in bf16 (other experts)
    ro = engine.generate(prompts, n=8, max_new_tokens=64, temperature=1.0, seed=0, return_routes=True)
    engine.load_weights(policy)                                    # copy (and re-cast / re-quantise) in place

The engine holds its own copy of the weights (θ_old for the next rollout), so training the policy does not change
rollouts until :meth:`~TransformersEngine.load_weights`. Sampling is a plain KV-cached loop — prefill, then one
token per step for every row — so the engine controls exactly what μ is:

    μ_t = log_softmax(f(logits_t) )[y_t],   f = divide by temperature, then mask outside the top-p nucleus

computed in float32 from the engine's (possibly bf16 / fp8) logits — the same "processed logprobs" vLLM returns.
Temperature 0 is greedy with μ = log_softmax(logits)[y_t].

Routes (R3 on CPU): with ``return_routes=True`` every forward of the loop runs inside
:func:`pgzoo.routing.record`, so the prefill records the prompt positions and each decode step the token it fed;
routes come back aligned to ``cat([prompt_ids, completion_ids], 1)`` (the last sampled token, never fed, and
padding hold UNROUTED = -1).
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Sequence
from typing import Any

import torch

from pgzoo.errors import ConfigError, EngineError, require
from pgzoo.rollout.base import Rollouts, assemble, check_generate_args, prompt_seeds, unwrap
from pgzoo.rollout.capabilities import EngineCapabilities
from pgzoo.rollout.fp8 import GRANULARITIES, fp8_parameter_names, quantize_fp8_tensor

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def top_p_mask(scaled: torch.Tensor, top_p: float) -> torch.Tensor:
    """Set logits outside the smallest set of tokens whose probability reaches ``top_p`` to -inf.

    Ties broken by sort order; the most probable token is always kept.
    """
    if top_p >= 1.0:
        return scaled
    sorted_logits, order = scaled.sort(dim=-1, descending=False)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop = cum <= 1 - top_p
    drop[..., -1] = False
    return scaled.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def sample_next(
    logits: torch.Tensor, temperature: float, top_p: float,
    generator: torch.Generator | Sequence[torch.Generator] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sampling step: ``(tokens [B], logprobs [B])`` with μ of the sampled token after temperature / top-p.

    ``generator``: one for the whole batch, one per row (row ``b`` draws from ``generator[b]`` alone, so its token
    does not depend on the other rows), or None (the global generator).
    """
    logits = logits.float()
    if temperature == 0:
        lp = torch.log_softmax(logits, -1)
        tok = lp.argmax(-1)
    else:
        lp = torch.log_softmax(top_p_mask(logits / temperature, top_p), -1)
        probs = lp.exp()
        if isinstance(generator, Sequence):
            tok = multinomial_per_row(probs, generator)
        else:
            tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tok, lp.gather(-1, tok[:, None]).squeeze(-1)


def multinomial_per_row(probs: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One token per row of ``probs [B, V]``, row ``b`` drawn from ``generators[b]`` alone: the tokens
    ``torch.multinomial(probs[b], 1, generator=generators[b])`` returns, row by row, in one batched division.

    torch draws a single sample as ``argmax(p / q)`` with ``q ~ Exp(1)`` of p's shape from the generator (the
    exponential race; ``multinomial`` in ATen's ``Distributions.cpp``), so drawing each row's ``q`` from its own
    generator and dividing all rows at once gives the same tokens and leaves each generator in the same state, without
    B calls of ``multinomial`` and their per-call input checks (most of the sampling time for a small vocabulary:
    the checks are replaced by one finiteness test of the sampled logprobs in the caller)."""
    q = torch.empty_like(probs)
    for row, generator in zip(q, generators, strict=True):
        row.exponential_(generator=generator)
    return (probs / q).argmax(-1)


class TransformersEngine:
    """Sampling with a transformers causal LM in float32 / bfloat16 / float16, optionally FP8-fake-quantised.

    Args:
        model_or_path: a ``PreTrainedModel`` (copied unless ``copy=False``) or a checkpoint folder.
        dtype: rollout precision, ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        fp8: round attention / MLP / expert weights through FP8 e4m3 (see :mod:`pgzoo.rollout.fp8`).
        fp8_granularity: ``"per-channel"`` (default) or ``"per-tensor"`` scales.
        router_dtype: compute every MoE router's logits in this dtype (``"bfloat16"``, ``"float16"``,
            ``"float32"``), so tokens near a top-k tie go to other experts than in the trainer
            (:mod:`pgzoo.rollout.router_precision`); None (default): the router runs like the rest of the engine.
        copy: keep a private copy of the weights (default). ``copy=False`` with float32 and no FP8 samples from
            the given module itself (then :meth:`load_weights` of that module is a no-op).
        device: where the engine's model lives (default: the given model's device, else CPU).
        max_batch_size: rows per forward; larger requests run in chunks.

    Attributes:
        capabilities: what the engine declares (recipe checks and tests/test_engine_contract.py read it).
        supports_routes: True for MoE families :mod:`pgzoo.routing` knows (Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE).
    """

    capabilities = EngineCapabilities(
        dtypes=tuple(DTYPES),
        fp8=True,
        fp8_dtypes=tuple(DTYPES),  # fake quantisation: FP8-rounded weights in any compute dtype
        router_dtype=True,
        routes=True,  # recorded while generating, on any device (for the MoE families pgzoo.routing knows)
        lora_sync=True,
        sharded_sync=True,  # load_weight_buckets
        background_generate=True,  # its own copy of the weights (copy=False: check_background_generate refuses)
        device_choice=True,  # device=
        logprob_tolerance=1e-5,  # float32 copy of the policy: KV-cached loop vs one full forward, ~1e-7 mean
        notes=(("weight_transfer", "its model copy lives in the trainer's process: load_weights copies tensor to "
                                   "tensor, device to device, with no transfer API between"),),
    )

    def __init__(
        self,
        model_or_path: Any,
        dtype: str = "float32",
        fp8: bool = False,
        fp8_granularity: str = "per-channel",
        router_dtype: str | None = None,
        copy: bool = True,
        device: str | torch.device | None = None,
        max_batch_size: int = 256,
    ):
        if dtype not in DTYPES:
            raise ConfigError(f"TransformersEngine dtype={dtype!r}: choose one of {', '.join(DTYPES)}")
        if fp8_granularity not in GRANULARITIES:
            raise ConfigError(f"fp8_granularity={fp8_granularity!r}: choose one of {', '.join(GRANULARITIES)}")
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ConfigError(f"max_batch_size={max_batch_size!r} must be an integer >= 1")
        if isinstance(model_or_path, (str, os.PathLike)):
            transformers = require("transformers", "hf")
            model = transformers.AutoModelForCausalLM.from_pretrained(str(model_or_path), dtype=torch.float32)
        elif isinstance(model_or_path, torch.nn.Module):
            model = model_or_path
            if copy or dtype != "float32" or fp8 or router_dtype is not None:
                model = _copy_module(model)
        else:
            raise ConfigError(
                "TransformersEngine needs a transformers model or a checkpoint path, got "
                f"{type(model_or_path).__name__}"
            )
        if device is None:
            device = next(model.parameters()).device
        self.device = torch.device(device)
        self.dtype = dtype
        self.fp8 = bool(fp8)
        self.fp8_granularity = fp8_granularity
        self.max_batch_size = max_batch_size
        self._fp8_names = set(fp8_parameter_names(model)) if fp8 else set()
        source = {k: v.detach() for k, v in model.state_dict().items()}
        self._shares_module = model is model_or_path
        # A shared module is the caller's (often the policy being trained): never freeze it or change its mode.
        self.model = model if self._shares_module else model.to(self.device).eval().requires_grad_(False)
        if not self._shares_module:
            self._write(source)
        config = self.model.config
        text = getattr(config, "text_config", None) or config
        self.max_model_len = int(getattr(text, "max_position_embeddings", 0) or 0) or None
        self.vocab_size = int(getattr(text, "vocab_size", 0) or 0) or None
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if eos is None:
            eos = getattr(config, "eos_token_id", None)
        self.eos_token_ids = set(eos if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos]))
        pad = getattr(config, "pad_token_id", None)
        self.pad_token_id = int(pad if pad is not None else (min(self.eos_token_ids) if self.eos_token_ids else 0))
        self.supports_routes = self._detect_routes()
        self.router_dtype = router_dtype
        if router_dtype is not None:
            from pgzoo.rollout.router_precision import lower_router_precision

            self._router_hooks = lower_router_precision(self.model, router_dtype)
        self.last_sync_seconds: float | None = None
        self._cancelled = False  # set from another thread by cancel(); a plain flag (one store, no lock needed)

    @property
    def owns_weights(self) -> bool:
        """Whether the engine samples from a copy of its own (False: from the module it was given, ``copy=False``),
        so a trainer may update its policy while :meth:`generate` runs in another thread."""
        return not self._shares_module

    def check_background_generate(self) -> None:
        """Raise :class:`~pgzoo.errors.ConfigError` unless :meth:`generate` may run in a background thread while the
        trainer updates its policy (``rollout.max_staleness`` >= 1): the engine must sample from a copy of its own."""
        if not self.owns_weights:
            raise ConfigError("the rollout engine samples from the policy module itself (TransformersEngine("
                              "copy=False)), which the trainer updates while the engine generates; build it with "
                              "copy=True")

    def cancel(self) -> None:
        """Stop the :meth:`generate` running in another thread at its next token; it raises :class:`EngineError`.
        A later call of :meth:`generate` runs normally."""
        self._cancelled = True

    def _detect_routes(self) -> bool:
        try:
            from pgzoo.routing import find_moe_layers

            return bool(find_moe_layers(self.model))
        except Exception:
            return False

    @torch.no_grad()
    def _write(self, state: dict[str, torch.Tensor]) -> None:
        """Copy a whole ``state`` (the engine's own module names) into the engine; used at construction."""
        self.check_sync_plan([(k, tuple(v.shape), v.dtype) for k, v in state.items()])
        self._write_tensors(state.items())

    @torch.no_grad()
    def _write_tensors(self, named) -> set[str]:
        """Copy ``(name, tensor)`` pairs into the engine's parameters and buffers, casting and FP8-rounding as
        configured; returns the parameter names written."""
        target = DTYPES[self.dtype]
        params = self._params
        buffers = self._buffers
        written = set()
        for name, src in named:
            p = params.get(name)
            if p is None:
                b = buffers.get(name)
                if b is not None and src.shape == b.shape:
                    b.copy_(src.to(b.device))
                continue
            if src.shape != p.shape:
                raise EngineError(f"load_weights: {name} has shape {tuple(src.shape)}, the engine's {tuple(p.shape)}")
            src = src.to(device=p.device, dtype=torch.float32) if src.is_floating_point() else src.to(p.device)
            if name in self._fp8_names:
                src = quantize_fp8_tensor(src, self.fp8_granularity)
            if p.dtype != target and p.is_floating_point():
                p.data = src.to(target)
            else:
                p.copy_(src)
            written.add(name)
        return written

    @property
    def _params(self) -> dict[str, torch.nn.Parameter]:
        return dict(self.model.named_parameters())

    @property
    def _buffers(self) -> dict[str, torch.Tensor]:
        return dict(self.model.named_buffers())

    # -- weight sync (streaming: see pgzoo.rollout.sync) --------------------------------------------------------
    sync_names = "module"  # the engine's model is a transformers module: fused MoE experts as in state_dict

    def check_sync_plan(self, plan) -> None:
        """Raise :class:`EngineError` unless ``plan`` (``[(name, shape, dtype)]``) covers every parameter of the
        engine's model with its shape."""
        params = self._params
        shapes = {name: tuple(shape) for name, shape, _ in plan}
        missing = [k for k in params if k not in shapes]
        if missing:
            raise EngineError(
                f"load_weights: the module lacks {missing[:4]}{' ...' if len(missing) > 4 else ''} that the engine's "
                f"model has: sync the same architecture the engine was built from"
            )
        wrong = [(k, shapes[k], tuple(p.shape)) for k, p in params.items() if shapes[k] != tuple(p.shape)]
        if wrong:
            raise EngineError(f"load_weights: shape mismatch {wrong[:3]} (name, sent, engine's): sync the same "
                              f"architecture the engine was built from")

    def load_weight_buckets(self, buckets) -> None:
        """Copy buckets of ``(name, tensor)`` (module names) into the engine, one bucket at a time (each is let go
        before the next is read); what :func:`pgzoo.rollout.sync.sync_weights` calls."""
        import time

        self._check_open()
        start = time.perf_counter()
        written: set[str] = set()
        for bucket in buckets:
            written |= self._write_tensors(bucket)
            del bucket
        missing = [k for k in self._params if k not in written]
        if missing:
            raise EngineError(f"load_weights: the sync sent no {missing[:4]}; the engine now mixes old and new "
                              f"weights: sync again from the full model")
        self.last_sync_seconds = time.perf_counter() - start

    def load_weights(self, model: torch.nn.Module, bucket_mb: float | None = None) -> None:
        """Copy ``model``'s weights into the engine (cast to the rollout dtype, FP8-rounded when ``fp8``).

        ``model`` may be a plain transformers model, an FSDP2-sharded one (call on every rank) or a PEFT LoRA model
        (its effective weights are synced); see :func:`pgzoo.rollout.sync.sync_weights`.

        Raises:
            EngineError: NaN/Inf in the weights (nothing is copied), or an architecture mismatch.
        """
        import time

        from pgzoo.rollout.sync import DEFAULT_BUCKET_MB, sync_weights

        self._check_open()
        start = time.perf_counter()
        if unwrap(model) is self.model:
            self.last_sync_seconds = 0.0
            return
        sync_weights(model, self, bucket_mb=bucket_mb or DEFAULT_BUCKET_MB)
        self.last_sync_seconds = time.perf_counter() - start

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        n: int = 1,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | Sequence[int] | None = None,
        return_routes: bool = False,
    ) -> Rollouts:
        """Sample ``n`` completions per prompt; see :class:`~pgzoo.rollout.Rollouts` for the layout.

        ``seed``: completion ``j`` of prompt ``i`` samples from its own ``torch.Generator`` seeded with
        ``seeds[i] + j`` (``seed=s`` means ``seeds[i] = s + i``; "Seeds" in :mod:`pgzoo.rollout.base`), so a row's
        tokens do not depend on the other rows or on ``max_batch_size``; None uses the global RNG.
        """
        self._check_open()
        prompts = check_generate_args(prompts, n, max_new_tokens, temperature, top_p, self.max_model_len,
                                      self.vocab_size)
        if return_routes and not self.supports_routes:
            raise EngineError(
                f"return_routes=True: {type(self.model).__name__} has no MoE layers pgzoo.routing can record "
                f"(supported: Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE)"
            )
        self._cancelled = False
        rows = [p for p in prompts for _ in range(n)]
        # one seed per row, None: the global generator (row j of prompt i: seeds[i] + j)
        seeds = None if seed is None else [s + j for s in prompt_seeds(seed, len(prompts)) for j in range(n)]
        completions, logprobs, truncated, routes = [], [], [], []
        for start in range(0, len(rows), self.max_batch_size):
            chunk = rows[start: start + self.max_batch_size]
            generators = None if seeds is None else [self._generator(s) for s in seeds[start: start + len(chunk)]]
            c, lp, tr, rt = self._generate_chunk(chunk, max_new_tokens, temperature, top_p, generators, return_routes)
            completions += c
            logprobs += lp
            truncated += tr
            routes += rt
        return assemble(prompts, n, completions, logprobs, truncated, self.pad_token_id,
                        routes if return_routes else None)

    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    def _generate_chunk(self, rows, max_new_tokens, temperature, top_p, generator, return_routes):
        device = self.device
        batch, p_len = len(rows), max(len(r) for r in rows)
        ids = torch.full((batch, p_len), self.pad_token_id, dtype=torch.long, device=device)
        am = torch.zeros(batch, p_len, dtype=torch.long, device=device)
        for i, r in enumerate(rows):
            ids[i, p_len - len(r):] = torch.tensor(r, dtype=torch.long, device=device)
            am[i, p_len - len(r):] = 1
        pos = (am.cumsum(-1) - 1).clamp(min=0)
        eos = torch.tensor(sorted(self.eos_token_ids) or [-1], device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        tokens, lps = [], []
        if return_routes:
            from pgzoo.routing import record

            recorder = record(self.model)
        else:
            recorder = contextlib.nullcontext()
        with recorder as rec:
            out = self.model(input_ids=ids, attention_mask=am, position_ids=pos, use_cache=True, logits_to_keep=1)
            for step in range(max_new_tokens):
                tok, lp = sample_next(out.logits[:, -1], temperature, top_p, generator)
                tok = torch.where(finished, torch.full_like(tok, self.pad_token_id), tok)
                tokens.append(tok)
                lps.append(lp)
                finished = finished | torch.isin(tok, eos)
                if step == max_new_tokens - 1 or bool(finished.all()):  # host sync: one per step
                    break
                if self._cancelled:
                    raise EngineError("generation cancelled (TransformersEngine.cancel)")
                am = torch.cat([am, am.new_ones(batch, 1)], dim=1)
                pos = pos[:, -1:] + 1
                out = self.model(input_ids=tok[:, None], attention_mask=am, position_ids=pos,
                                 past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
        tok_mat = torch.stack(tokens, 1).cpu()
        lp_mat = torch.stack(lps, 1).float().cpu()
        if not bool(torch.isfinite(lp_mat).all()):
            # NaN/inf logits (diverged weights): a sampled token's μ is not a number, or a token of probability 0
            raise EngineError("the engine's model produced non-finite logits while sampling (diverged or corrupted "
                              "weights): check the synced weights (rollout.verify_sync) and the run's loss")
        is_eos = torch.isin(tok_mat, eos.cpu())
        completions, logprobs, truncated, routes = [], [], [], []
        recorded = rec.routes.cpu() if return_routes else None
        for i, r in enumerate(rows):
            hits = is_eos[i].nonzero()
            length = int(hits[0]) + 1 if len(hits) else tok_mat.shape[1]
            completions.append(tok_mat[i, :length].tolist())
            logprobs.append(lp_mat[i, :length])
            truncated.append(not len(hits) and length == max_new_tokens)
            if recorded is not None:
                routes.append(recorded[i, p_len - len(r):])
        return completions, logprobs, truncated, routes

    def _check_open(self) -> None:
        if self.model is None:
            raise EngineError("this TransformersEngine was closed; create a new one")

    def close(self) -> None:
        """Release the engine's model copy (a shared module is the caller's: only the engine's reference goes).
        A closed engine refuses to generate or sync; closing twice is fine."""
        self.model = None

    def __repr__(self) -> str:
        return (f"TransformersEngine({type(self.model).__name__}, dtype={self.dtype!r}, fp8={self.fp8}, "
                f"router_dtype={self.router_dtype!r}, "
                f"supports_routes={self.supports_routes})")


def _copy_module(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``model`` (parameters detached, no autograd history, no hooks carried)."""
    try:
        return copy.deepcopy(model)
    except Exception as exc:  # pragma: no cover - exotic wrappers
        raise EngineError(f"could not copy {type(model).__name__} for the rollout engine ({exc}); pass copy=False "
                          f"with dtype='float32' and fp8=False, or a checkpoint path") from exc
