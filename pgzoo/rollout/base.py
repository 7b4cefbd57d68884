"""What every rollout engine returns (:class:`Rollouts`) and the protocol trainers program against.

    engine: RolloutEngine = pgzoo.rollout.VLLMEngine(path)       # or TransformersEngine(model, dtype="bfloat16")
    ro = engine.generate(prompts, n=8, max_new_tokens=64, temperature=1.0, seed=0)
    ro = engine.generate(prompts, n=8, seed=[s0, s1, ...])      # one seed per prompt (see "Seeds" below)
    ro.completion_ids, ro.completion_mask, ro.logprobs           # [N, T]; N = len(prompts) * n, prompt-major
    engine.load_weights(policy)                                  # in place, after every optimizer phase

Layout (N rows = prompts × n, rows of one prompt contiguous; P = longest prompt, T = longest completion):

* ``prompt_ids [N, P]`` left-padded, ``prompt_mask [N, P]`` bool;
* ``completion_ids [N, T]`` right-padded, ``completion_mask [N, T]`` bool (an EOS the engine generated is a
  counted token: the policy chose to stop);
* ``logprobs [N, T]`` float32: log μ(y_t | x, y_<t) of the sampled token under the *processed* distribution —
  softmax(logits / temperature), restricted and renormalised to the top-p nucleus when top_p < 1 — and 0 at padding;
  with temperature 0 (greedy) the plain log-softmax;
* ``truncated [N]`` bool: the completion hit ``max_new_tokens`` without EOS;
* ``group [N]`` long: the index of the prompt each row answers;
* ``routes [N, P+T, L_moe, k]`` long or None: expert ids the engine routed each token to, aligned to
  ``input_ids = cat([prompt_ids, completion_ids], 1)``; positions the engine never ran (padding, the last sampled
  token) hold :data:`pgzoo.routing.UNROUTED` (-1), which replay leaves to the router.

Seeds (every engine alike): ``seed=[s_0, ..., s_{P-1}]`` seeds prompt ``i`` with ``s_i`` and completion ``j`` of it
with ``s_i + j`` (vLLM's own rule for ``n > 1``), so what a prompt draws depends on its seed only — not on the other
prompts of the call, their order, or how the engine batches rows. That is what lets ranks that each sample a share of
a step's prompts draw what one process sampling them all would (the trainer seeds each prompt by its index in the
step). ``seed=s`` is ``[s, s + 1, ...]``; ``seed=None`` draws from the engine's own generator.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

from pgzoo.errors import EngineError

UNROUTED = -1  # same value as pgzoo.routing.UNROUTED (kept here so this module imports without the routing package)


@dataclasses.dataclass
class Rollouts:
    """A batch of sampled completions with the engine's logprobs (see the module docstring for the layout)."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    logprobs: torch.Tensor
    truncated: torch.Tensor
    group: torch.Tensor
    routes: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n, p = self.prompt_ids.shape
        t = self.completion_ids.shape[1]
        expect = {
            "prompt_mask": (n, p),
            "completion_mask": (n, t),
            "logprobs": (n, t),
            "truncated": (n,),
            "group": (n,),
        }
        for name, shape in expect.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise EngineError(f"Rollouts.{name} has shape {got}, expected {shape} (N={n}, P={p}, T={t})")
        if self.routes is not None and (self.routes.dim() != 4 or tuple(self.routes.shape[:2]) != (n, p + t)):
            raise EngineError(
                f"Rollouts.routes has shape {tuple(self.routes.shape)}, expected [N, P+T, L, k] = [{n}, {p + t}, L, k]"
            )

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    @property
    def input_ids(self) -> torch.Tensor:
        """``[N, P+T]`` prompt and completion ids, the input of the training forward."""
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """``[N, P+T]`` long attention mask matching :attr:`input_ids`."""
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1).long()

    @property
    def completion_lengths(self) -> torch.Tensor:
        """``[N]`` number of counted completion tokens per row."""
        return self.completion_mask.sum(1)

    @property
    def num_tokens(self) -> int:
        """Total counted completion tokens (one host sync)."""
        return int(self.completion_mask.sum())

    def completions(self) -> list[list[int]]:
        """Completion token ids per row, padding dropped (EOS kept when generated)."""
        return [ids[m].tolist() for ids, m in zip(self.completion_ids, self.completion_mask)]

    def select(self, rows: torch.Tensor | Sequence[int] | slice) -> Rollouts:
        """The rows ``rows`` (index tensor or list, boolean mask, or slice) as a new :class:`Rollouts`; ``group`` is
        kept as is."""
        if not isinstance(rows, slice):
            rows = torch.as_tensor(rows)
            rows = rows.nonzero().squeeze(-1) if rows.dtype == torch.bool else rows.long()
        return Rollouts(**{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[rows])
                           for f in dataclasses.fields(self)})

    def to(self, device: torch.device | str) -> Rollouts:
        return Rollouts(**{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name).to(device))
                           for f in dataclasses.fields(self)})


@runtime_checkable
class RolloutEngine(Protocol):
    """What a trainer needs from an inference engine.

    ``generate`` samples ``n`` completions per prompt (prompts are lists of token ids) and returns
    :class:`Rollouts`; ``load_weights(model)`` copies a Hugging Face torch module's current weights into the engine in
    place (no restart); ``supports_routes`` says whether ``generate(..., return_routes=True)`` works.

    pgzoo's engines also take ``load_weight_buckets(buckets)``, the streamed form :func:`pgzoo.rollout.sync.
    sync_weights` feeds (needed for a sharded policy); the Lightning loop uses it where an engine has it and
    ``load_weights`` otherwise.
    """

    supports_routes: bool

    def generate(
        self,
        prompts: list[list[int]],
        n: int = 1,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | Sequence[int] | None = None,
        return_routes: bool = False,
    ) -> Rollouts: ...

    def load_weights(self, model: torch.nn.Module) -> None: ...

    def close(self) -> None: ...


# -- shared helpers for engines ---------------------------------------------------------------------------------
def check_generate_args(
    prompts,
    n: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    max_len: int | None,
    vocab_size: int | None = None,
) -> list[list[int]]:
    """Validate ``generate`` arguments the same way for every engine; return prompts as lists of ints."""
    if isinstance(prompts, torch.Tensor):
        raise EngineError("prompts must be a list of token-id lists (unpadded), not a tensor: use [p.tolist() ...]")
    if prompts is None or len(prompts) == 0:
        raise EngineError("generate() got an empty prompt list: pass at least one prompt (a list of token ids)")
    if isinstance(prompts[0], str):
        raise EngineError("prompts must be token ids, not strings: tokenize first, e.g. tokenizer(text).input_ids")
    if not isinstance(n, int) or n < 1:
        raise EngineError(f"n={n!r}: the number of completions per prompt must be an integer >= 1")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise EngineError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise EngineError(f"temperature={temperature!r} must be a finite number >= 0 (0 means greedy)")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise EngineError(f"top_p={top_p!r} must be in (0, 1]")
    out = []
    for i, p in enumerate(prompts):
        p = [int(t) for t in (p.tolist() if isinstance(p, torch.Tensor) else p)]
        if not p:
            raise EngineError(f"prompt {i} is empty: every prompt needs at least one token (e.g. BOS)")
        if vocab_size is not None and (min(p) < 0 or max(p) >= vocab_size):
            raise EngineError(f"prompt {i} holds token ids outside the vocabulary [0, {vocab_size})")
        if max_len is not None and len(p) + max_new_tokens > max_len:
            raise EngineError(
                f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} it needs "
                f"{len(p) + max_new_tokens}"
                f" positions but the engine's context is {max_len}: shorten the prompt, lower max_new_tokens, or raise "
                f"the engine's max_model_len (up to the model's max_position_embeddings)"
            )
        out.append(p)
    return out


def prompt_seeds(seed, num_prompts: int) -> list[int | None]:
    """One seed per prompt from ``generate``'s ``seed`` argument (see "Seeds" in the module docstring)."""
    if seed is None:
        return [None] * num_prompts
    if isinstance(seed, bool):
        raise EngineError(f"seed={seed!r}: a seed is an integer, a list of one integer per prompt, or None")
    if isinstance(seed, int) or (isinstance(seed, torch.Tensor) and seed.ndim == 0 and not seed.is_floating_point()):
        return [int(seed) + i for i in range(num_prompts)]
    if isinstance(seed, (str, bytes)) or not isinstance(seed, (Sequence, torch.Tensor)):
        raise EngineError(f"seed={seed!r}: a seed is an integer, a list of one integer per prompt, or None")
    seeds = list(seed.tolist() if isinstance(seed, torch.Tensor) else seed)
    if len(seeds) != num_prompts:
        raise EngineError(f"seed: {len(seeds)} seeds for {num_prompts} prompts; pass one seed per prompt (or one int)")
    bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, int) or s < 0]
    if bad:
        raise EngineError(f"seed: {bad[0]!r} is not a non-negative integer; every per-prompt seed must be one")
    return seeds


def mix_seed(*parts: int) -> int:
    """A seed in [0, 2**31) hashed from integers (e.g. run seed, step, prompt index): seeds of neighbouring inputs
    lie far apart, so ``seed + j`` of one prompt never meets another prompt's seed (as ``base + index`` would)."""
    digest = hashlib.blake2b(":".join(str(int(p)) for p in parts).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") >> 1


def assemble(
    prompts: list[list[int]],
    n: int,
    completions: list[list[int]],
    logprobs: list[Sequence[float]] | list[torch.Tensor],
    truncated: list[bool],
    pad_id: int,
    routes: list[torch.Tensor] | None = None,
) -> Rollouts:
    """Pad per-row results into :class:`Rollouts`.

    ``completions``, ``logprobs`` and ``truncated`` hold ``len(prompts) * n`` rows, prompt-major. ``routes`` (if
    given) holds per row a long tensor ``[S_i, L, k]`` aligned to that row's unpadded ``prompt + completion``
    positions (``S_i <= len(prompt) + len(completion)``; missing tail positions become UNROUTED).
    """
    rows = len(prompts) * n
    if not (len(completions) == len(logprobs) == len(truncated) == rows):
        raise EngineError(f"engine returned {len(completions)} completions for {len(prompts)} prompts x n={n}")
    p_len = max(len(p) for p in prompts)
    t_len = max(1, max(len(c) for c in completions))
    prompt_ids = torch.full((rows, p_len), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros(rows, p_len, dtype=torch.bool)
    completion_ids = torch.full((rows, t_len), pad_id, dtype=torch.long)
    completion_mask = torch.zeros(rows, t_len, dtype=torch.bool)
    lp = torch.zeros(rows, t_len, dtype=torch.float32)
    route_t = None
    if routes is not None:
        shape = routes[0].shape[1:]
        route_t = torch.full((rows, p_len + t_len, *shape), UNROUTED, dtype=torch.long)
    for r in range(rows):
        prompt, comp = prompts[r // n], completions[r]
        prompt_ids[r, p_len - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        prompt_mask[r, p_len - len(prompt):] = True
        if comp:
            completion_ids[r, : len(comp)] = torch.tensor(comp, dtype=torch.long)
            completion_mask[r, : len(comp)] = True
            lp[r, : len(comp)] = torch.as_tensor(logprobs[r], dtype=torch.float32)[: len(comp)]
        if route_t is not None:
            rr = routes[r]
            real = len(prompt) + len(comp)
            rr = rr[:real]
            k_p = min(len(prompt), rr.shape[0])
            route_t[r, p_len - len(prompt): p_len - len(prompt) + k_p] = rr[:k_p]
            if rr.shape[0] > len(prompt):
                route_t[r, p_len: p_len + rr.shape[0] - len(prompt)] = rr[len(prompt):]
    return Rollouts(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        logprobs=lp,
        truncated=torch.tensor(truncated, dtype=torch.bool),
        group=torch.arange(len(prompts)).repeat_interleave(n),
        routes=route_t,
    )


def unwrap(model):
    """The Hugging Face module inside ``torch.compile`` (``_orig_mod``) and DistributedDataParallel wrappers."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        else:
            return model
