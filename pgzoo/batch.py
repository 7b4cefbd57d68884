"""TokenBatch: the one token-tensor interface every pgzoo objective takes (docs/design.md §3).

Shapes: B sequences (rows) by T completion positions. ``mask`` marks the completion tokens that count; values at
masked positions (padding, prompt, tool output) never influence loss, gradient or metrics, NaN included.

Normalisers are explicit. ``num_sequences`` and ``num_tokens`` default to this batch's own counts; a trainer that
splits a mini-batch over ranks or micro-batches passes the *global* counts so that the summed gradient equals the
single-process gradient of the whole mini-batch.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, fields

import torch

from pgzoo.errors import BatchError

_TOKEN_FIELDS = ("old_logprobs", "rollout_logprobs", "ref_logprobs")
_NORMALISERS = ("num_sequences", "num_tokens", "max_tokens")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class _MaskedProduct(torch.autograd.Function):
    """y = c·x with non-finite products zeroed, for a detached coefficient c that is 0 at masked positions and finite
    elsewhere (the mask itself, or a per-token coefficient); ∂y/∂x = c, so the gradient is 0 where masked whatever x
    holds there (NaN/±inf included)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(c)
        return (x * c).nan_to_num_(0.0, 0.0, 0.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (c,) = ctx.saved_tensors
        return grad * c, None


@dataclass
class TokenBatch:
    """Per-token inputs of a policy-gradient objective.

    Args:
        logprobs: ``[B, T]`` log π_θ(y_t | x, y_<t) of the sampled tokens under the current policy; carries grad.
        mask: ``[B, T]`` bool or 0/1: completion tokens that count.
        advantages: ``[B]`` per sequence or ``[B, T]`` per token.
        old_logprobs: ``[B, T]`` log π_θold from the training engine (no grad). ``None`` means on-policy:
            ``logprobs.detach()`` is used.
        rollout_logprobs: ``[B, T]`` log μ_θold from the inference engine that sampled the tokens (no grad).
        ref_logprobs: ``[B, T]`` reference-policy logprobs, for KL-penalised objectives (no grad).
        num_sequences: sequence normaliser. Default: rows with at least one unmasked token.
        num_tokens: token normaliser. Default: ``mask.sum()``.
        max_tokens: constant normaliser L (Dr. GRPO). Default: ``T``.
            Normalisers are Python or numpy numbers, or one-element tensors (e.g. an all-reduced count);
            they must be positive and finite.
        entropies: ``[B, T]`` per-token entropies of π_θ (may carry grad), for the loss-shaping options that use
            them (``top_entropy_quantile``, ``entropy_coef``); ``None`` otherwise. ``pgzoo.models.logprobs`` computes them.
        check_values: also check values: unmasked values finite, a non-bool mask only 0/1, tensor normalisers
            positive and finite. This costs one host sync; trainers that validate upstream may pass ``False``
            (those are then the caller's guarantee: eager masking zeroes any non-finite product). Shape, dtype,
            device and gradient checks always run (they are free).

    Fixed quantities (``advantages``, ``old/rollout/ref_logprobs``, normaliser tensors) must not carry gradient,
    and no tensor may be on the ``meta`` device. Calling an objective with grad mode on requires
    ``logprobs.requires_grad`` (otherwise the loss could not train anything); under ``torch.no_grad()`` or
    ``torch.inference_mode()`` a loss is evaluated from plain tensors as well.

    Example:
        >>> import torch, pgzoo
        >>> lp = torch.randn(4, 8).clamp(max=0).requires_grad_()
        >>> batch = pgzoo.TokenBatch(logprobs=lp, mask=torch.ones(4, 8), advantages=torch.randn(4),
        ...                          rollout_logprobs=lp.detach())
        >>> out = pgzoo.get("minirl")(batch)
        >>> out.loss.backward()
    """

    logprobs: torch.Tensor
    mask: torch.Tensor
    advantages: torch.Tensor
    old_logprobs: torch.Tensor | None = None
    rollout_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    num_sequences: int | float | torch.Tensor | None = None
    num_tokens: int | float | torch.Tensor | None = None
    max_tokens: int | float | None = None
    check_values: bool = True
    entropies: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self._validate_structure()
        mask_not_01 = None
        if self.mask.dtype != torch.bool and self.check_values:  # checked in the one fused sync below
            mask_not_01 = ((self.mask != 0) & (self.mask != 1)).any()
        self.mask = self.mask.to(torch.bool)
        for name in _NORMALISERS:  # a one-element tensor ([1], [1, 1]) as 0-d, so the loss stays a scalar
            value = getattr(self, name)
            if isinstance(value, torch.Tensor) and value.dim():
                setattr(self, name, value.reshape(()))
        if self.advantages.dim() == 2 and self.advantages.shape[1] == 1:
            self.advantages = self.advantages[:, 0]
        if self.check_values:
            self._validate_values(mask_not_01)

    # ------------------------------------------------------------------ validation
    def _validate_structure(self) -> None:
        lp = self.logprobs
        if not isinstance(lp, torch.Tensor):
            raise BatchError("logprobs", f"expected a torch.Tensor, got {type(lp).__name__}",
                             "pass the [B, T] per-token log-probabilities as a tensor")
        if lp.device.type == "meta":
            raise BatchError("logprobs", "is on the meta device (a shape without data)",
                             "materialise the model's weights (e.g. load_state_dict / to_empty + init) before "
                             "computing logprobs")
        if lp.dim() != 2:
            raise BatchError("logprobs", f"expected rank 2 [B, T], got shape {tuple(lp.shape)}",
                             "gather the sampled tokens' log-probabilities into a [batch, completion_len] tensor")
        if lp.dtype not in _FLOAT_DTYPES:
            raise BatchError("logprobs", f"expected a floating dtype, got {lp.dtype}",
                             "cast with .float() (log-probabilities are real numbers)")
        B, T = lp.shape
        if B == 0 or T == 0:
            raise BatchError("logprobs", f"empty batch of shape {tuple(lp.shape)}",
                             "pass at least one sequence with at least one completion token")
        for name in ("mask", "advantages", *_TOKEN_FIELDS, "entropies"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, torch.Tensor):
                raise BatchError(name, f"expected a torch.Tensor or None, got {type(value).__name__}",
                                 "convert it with torch.as_tensor(...)")
            if value.device != lp.device:
                raise BatchError(name, f"is on {value.device} but logprobs is on {lp.device}",
                                 f"move it with .to({str(lp.device)!r})")
        if tuple(self.mask.shape) != (B, T):
            raise BatchError("mask", f"shape {tuple(self.mask.shape)} does not match logprobs {(B, T)}",
                             "pass a [B, T] mask aligned with logprobs")
        if self.mask.dtype.is_complex or (self.mask.dtype.is_floating_point and self.mask.dtype not in _FLOAT_DTYPES):
            raise BatchError("mask", f"unsupported dtype {self.mask.dtype}", "pass a bool or 0/1 tensor")
        adv = self.advantages
        if adv.requires_grad:
            raise BatchError("advantages", "carries gradient; advantages are fixed weights of the objective",
                             "pass them .detach()ed (compute them from rewards under torch.no_grad())")
        if adv.dtype not in _FLOAT_DTYPES:
            raise BatchError("advantages", f"expected a floating dtype, got {adv.dtype}",
                             "cast with .float()")
        if not (tuple(adv.shape) == (B,) or tuple(adv.shape) == (B, T) or tuple(adv.shape) == (B, 1)):
            raise BatchError("advantages", f"shape {tuple(adv.shape)} fits neither [B]={B} nor [B, T]={(B, T)}",
                             "pass one advantage per sequence [B] or one per token [B, T]")
        for name in _TOKEN_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            if tuple(value.shape) != (B, T):
                raise BatchError(name, f"shape {tuple(value.shape)} does not match logprobs {(B, T)}",
                                 "pass a [B, T] tensor aligned with logprobs (same padding)")
            if value.dtype not in _FLOAT_DTYPES:
                raise BatchError(name, f"expected a floating dtype, got {value.dtype}", "cast with .float()")
            if value.requires_grad:
                raise BatchError(name, "carries gradient; it is a fixed quantity of the objective",
                                 "pass it .detach()ed (compute it under torch.no_grad())")
        ent = self.entropies
        if ent is not None:
            if tuple(ent.shape) != (B, T):
                raise BatchError("entropies", f"shape {tuple(ent.shape)} does not match logprobs {(B, T)}",
                                 "pass the [B, T] per-token entropies aligned with logprobs (same padding)")
            if ent.dtype not in _FLOAT_DTYPES:
                raise BatchError("entropies", f"expected a floating dtype, got {ent.dtype}", "cast with .float()")
        for name in _NORMALISERS:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    raise BatchError(name, f"expected a scalar, got shape {tuple(value.shape)}",
                                     "pass the global count as a Python number or a one-element tensor")
                if value.dtype == torch.bool or value.dtype.is_complex:
                    raise BatchError(name, f"expected a real count, got dtype {value.dtype}",
                                     "pass the count as an integer or float tensor")
                if value.device.type == "meta":
                    raise BatchError(name, "is on the meta device (a shape without data)",
                                     "pass the computed count")
                if value.requires_grad:
                    raise BatchError(name, "carries gradient; a normaliser is a fixed count",
                                     "pass it .detach()ed")
                continue  # its value (> 0, finite) is checked with the others in _validate_values
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < float(value) < float("inf"):
                raise BatchError(name, f"expected a positive finite number, got {value!r}",
                                 "pass the global count over all ranks and micro-batches (> 0), or None")

    def _validate_values(self, mask_not_01: torch.Tensor | None = None) -> None:
        # One fused reduction and a single host sync: is every unmasked value finite, is the mask 0/1, are tensor
        # normalisers positive and finite, and does any token count?
        mask = self.mask
        checks = {"logprobs": self.logprobs.detach()}
        for name in _TOKEN_FIELDS:
            if getattr(self, name) is not None:
                checks[name] = getattr(self, name)
        if self.entropies is not None:
            checks["entropies"] = self.entropies.detach()
        adv = self.advantages
        adv_tok = adv[:, None].expand_as(mask) if adv.dim() == 1 else adv
        checks["advantages"] = adv_tok
        flags = [(~torch.isfinite(v) & mask).any() for v in checks.values()]
        extra: list[tuple[str, str, str]] = []
        if mask_not_01 is not None:
            flags.append(mask_not_01.to(mask.device))
            extra.append(("mask", "holds values other than 0 and 1",
                          "pass a bool mask, or 0/1 values (a weight per token is not a mask: fold it into the "
                          "advantages)"))
        for name in _NORMALISERS:
            value = getattr(self, name)
            if isinstance(value, torch.Tensor):
                v = value.detach().reshape(())
                flags.append((~(torch.isfinite(v) & (v > 0))).to(mask.device))
                extra.append((name, "is not a positive finite count",
                              "pass the global count over all ranks and micro-batches (> 0)"))
        flags.append(~mask.any())
        bad = torch.stack(flags).tolist()
        for (name, problem, fix), is_bad in zip(extra, bad[len(checks):-1]):
            if is_bad:
                raise BatchError(name, problem, fix)
        for (name, value), is_bad in zip(checks.items(), bad[:len(checks)]):
            if is_bad:
                where = (~torch.isfinite(value) & mask).nonzero()[0].tolist()
                raise BatchError(name, f"non-finite value at unmasked position {tuple(where)}",
                                 "check the upstream computation, or set mask=0 at positions that do not count")
        if bad[-1] and self.num_tokens is None:
            raise BatchError("mask", "no unmasked token in the whole batch, so there is nothing to optimise",
                             "pass at least one completion token, or pass the global num_tokens/num_sequences "
                             "if this is one shard of a larger mini-batch")

    # ------------------------------------------------------------------ derived views
    # Derived tensors are computed once per batch and cached (objectives and metrics share them). Assigning a field
    # drops the cache; tensors modified in place are not detected, so treat the tensors of a batch as read-only (or
    # build a new batch with ``replace``).
    def __setattr__(self, name: str, value) -> None:
        object.__setattr__(self, name, value)
        if name != "_cache":
            self.__dict__.pop("_cache", None)

    def _cached(self, key: str, make):
        cache = self.__dict__.setdefault("_cache", {})
        if key not in cache:
            cache[key] = make()
        return cache[key]

    @property
    def batch_size(self) -> int:
        return self.logprobs.shape[0]

    @property
    def seq_len(self) -> int:
        return self.logprobs.shape[1]

    def mask_float(self) -> torch.Tensor:
        """The mask as 0/1 in the dtype of ``logprobs``."""
        return self._cached("mask_float", lambda: self.mask.to(self.logprobs.dtype))

    def masked(self, x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """``x`` with every masked position replaced by ``fill``; gradient there is exactly zero (NaN-safe).

        With ``fill=0`` this is ``(x · m)`` with non-finite products zeroed, and a gradient of ``grad · m``: the
        same values as ``torch.where(mask, x, 0)`` at unmasked finite positions (unmasked values are checked finite
        unless ``check_values=False``), and much cheaper than ``where`` on CPU.
        """
        if fill != 0.0 or torch.compiler.is_compiling():  # compiled: the select fuses into its consumers
            return torch.where(self.mask, x, fill)
        return _MaskedProduct.apply(x, self.mask_float().to(x.dtype))

    def zero_masked_(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with every masked position set to 0, in place (NaN-safe, as :meth:`masked`), returned.

        For a ``[B, T]`` tensor without gradient that the caller built and owns (a coefficient computed from the raw
        fields, garbage at masked positions included): one sanitisation at the end instead of one per input field.
        """
        if torch.compiler.is_compiling():  # compiled: the select fuses into its consumers
            return torch.where(self.mask, x, 0.0)
        return x.mul_(self.mask_float().to(x.dtype)).nan_to_num_(0.0, 0.0, 0.0)

    def logprobs_times(self, coef: torch.Tensor) -> torch.Tensor:
        """``coef · logprobs``, exactly 0 at masked positions whatever ``logprobs`` hold there (NaN, ±inf), with
        gradient ``coef · grad``: the term of every REINFORCE-type objective in one pass forward and one backward.

        ``coef``: a ``[B, T]`` tensor without gradient, exactly 0 at masked positions and finite elsewhere
        (:meth:`zero_masked_` makes one); it is kept for the backward, so it must not be modified afterwards.
        """
        if torch.compiler.is_compiling():
            return torch.where(self.mask, coef * self.logprobs, 0.0)
        return _MaskedProduct.apply(self.logprobs, coef)

    def token_advantages(self) -> torch.Tensor:
        """Advantages broadcast to ``[B, T]``, zero at masked positions."""

        def make():
            adv = self.advantages.to(self.logprobs.dtype)
            adv = adv[:, None].expand_as(self.logprobs) if adv.dim() == 1 else adv
            return self.masked(adv)

        return self._cached("token_advantages", make)

    def clean(self, name: str) -> torch.Tensor | None:
        """A per-token field with masked positions zeroed; ``old_logprobs`` falls back to ``logprobs.detach()``."""

        def make():
            value = getattr(self, name)
            if value is None and name == "old_logprobs":
                value = self.logprobs.detach()
            if value is None:
                return None
            return self.masked(value.detach().to(self.logprobs.dtype))

        return self._cached("clean:" + name, make)

    def seq_lengths(self) -> torch.Tensor:
        """|y_i|: unmasked tokens per row, as a float ``[B]`` tensor (0 for fully masked rows)."""
        return self._cached("seq_lengths", lambda: self.mask_float().sum(-1))

    def has_tokens(self) -> torch.Tensor:
        """``[B]`` bool: rows with at least one unmasked token."""
        return self._cached("has_tokens", lambda: self.seq_lengths() > 0)

    def local_token_count(self) -> torch.Tensor:
        """Unmasked tokens of this batch (ignores ``num_tokens``), as a 0-d float tensor."""
        return self._cached("local_token_count", lambda: self.seq_lengths().sum())

    def sequence_count(self) -> torch.Tensor | float:
        """N_seq: ``num_sequences`` or the number of rows with at least one unmasked token."""
        if self.num_sequences is not None:
            return self.num_sequences
        return self._cached("sequence_count", lambda: self.has_tokens().sum().to(self.logprobs.dtype))

    def token_count(self) -> torch.Tensor | float:
        """N_tok: ``num_tokens`` or ``mask.sum()``."""
        if self.num_tokens is not None:
            return self.num_tokens
        return self.local_token_count()

    def length_constant(self) -> float:
        """L: ``max_tokens`` or ``T``."""
        return float(self.max_tokens) if self.max_tokens is not None else float(self.seq_len)

    def first_token_index(self) -> torch.Tensor:
        """Flat index of one unmasked position (0-d long tensor; 0 if none) — a fill value for masked min/max.

        Found from the [B] row lengths and one [T] row, so it costs nothing next to a [B, T] pass (and no sync).
        """

        def make():
            row = self.seq_lengths().argmax(keepdim=True)  # a row with the most tokens (> 0 unless none at all)
            col = self.mask_float().index_select(0, row).argmax()  # tensor indices only: no host sync
            return row[0] * self.seq_len + col

        return self._cached("first_token_index", make)

    def in_float32(self) -> "TokenBatch":
        """This batch with its 16-bit tensors (float16, bfloat16) as float32 copies that keep the autograd graph (the
        gradient flows back to the 16-bit logprobs in their dtype); itself when none is 16-bit. Values were checked
        when this batch was built and widening is exact, so they are not checked again."""
        half = (torch.float16, torch.bfloat16)
        changes = {f.name: getattr(self, f.name).float() for f in fields(self)
                   if isinstance(getattr(self, f.name), torch.Tensor) and getattr(self, f.name).dtype in half}
        return self.replace(check_values=False, **changes) if changes else self

    def replace(self, **changes) -> "TokenBatch":
        """A copy with some fields replaced (validated again)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return TokenBatch(**values)
