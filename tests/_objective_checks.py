"""What tests/test_objective_properties.py needs to check any registered objective through its public interface.

Every objective is reached through ``pgzoo.get`` / ``pgzoo.available`` only; its batch is built from its ``requires``,
its option variants from the shared option names its ``config`` dataclass has. Nothing here names an objective, so an
objective registered by a plugin (or a test) is covered as soon as it is registered.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pgzoo
from pgzoo.testing import random_batch

TOKEN_FIELDS = ("old_logprobs", "rollout_logprobs", "ref_logprobs")
# The optional TokenBatch fields the suite can build; a ``requires`` naming anything else is a test failure.
BUILDABLE = frozenset(TOKEN_FIELDS) | {"entropies"}

# The loss-shaping options several families share (docs/objectives.md, "Loss-shaping options"), at values that make
# each one act on a small random batch. An objective gets the ones its Config has.
SHAPING = {"beta": 0.05, "top_entropy_quantile": 0.5, "off_policy_mask_threshold": 0.05, "entropy_coef": 0.01}
# The training-inference correction levels, in the order the suite tries them: its ``correction`` variant takes the
# first level an objective accepts (truncate mode), ``all-options`` the next (mask mode), so two levels and both modes
# are checked per objective (GSPO and GMPO reject per-token weights; each level's formula is checked against a naive
# loop in tests/test_objectives.py).
CORRECTION_LEVELS = ("sequence", "token", "geometric")


def config_fields(obj) -> set[str]:
    return {f.name for f in dataclasses.fields(obj.config)}


def variants(name: str) -> list[tuple[str, dict]]:
    """``(id, options)`` of the option sets ``name`` is checked under: ``plain`` (its registered defaults),
    ``correction`` (a training-inference correction, truncated) and ``all-options`` (every shared option it has at
    once, the correction masked) where it has those options."""
    fields = config_fields(pgzoo.get(name))
    out = [("plain", {})]
    levels = []
    if "correction" in fields:
        for level in CORRECTION_LEVELS:
            try:
                pgzoo.get(name, correction={"level": level})
            except pgzoo.ConfigError:  # a level this objective does not take (its own tests check that)
                continue
            levels.append(level)
        if not levels:  # the shared option exists but nothing builds: fail at collection, never drop silently
            raise AssertionError(f"{name} has a correction option but accepts no correction level")
        out.append(("correction", {"correction": {"level": levels[0], "mode": "truncate"}}))
    every = {}
    for key, value in SHAPING.items():
        if key not in fields:
            continue
        try:  # an option the objective refuses by design (a per-token mask on a per-sequence term): its own test
            pgzoo.get(name, **{key: value})
        except pgzoo.ConfigError:
            continue
        every[key] = value
    if levels:
        every["correction"] = {"level": levels[min(1, len(levels) - 1)], "mode": "mask"}
    if every:
        out.append(("all-options", every))
    return out


def cases(*, only: tuple[str, ...] | None = None) -> list:
    """``pytest.param(name, options)`` for every registered objective and variant (``only``: those variant ids)."""
    return [pytest.param(name, options, id=f"{name}-{vid}")
            for name in pgzoo.available() for vid, options in variants(name) if only is None or vid in only]


def make_batch(obj, *, per_token: bool = False, seed: int = 0, B: int = 4, T: int = 6,
               dtype: torch.dtype = torch.float64, scale: float = 0.3, pad_value: float | None = None,
               only_required: bool = False, **batch_kwargs) -> pgzoo.TokenBatch:
    """A random padded batch for ``obj``: every optional field it can use (old, rollout and reference logprobs,
    entropies that carry grad), or with ``only_required`` just the fields in ``obj.requires``. ``pad_value`` is
    written at every masked position of every tensor, advantages and entropies included."""
    unknown = set(obj.requires) - BUILDABLE
    assert not unknown, f"{obj.name} requires {sorted(unknown)}, which this suite cannot build: extend make_batch"
    want = set(obj.requires) if only_required else BUILDABLE
    base = random_batch(B, T, seed=seed, dtype=dtype, scale=scale, per_token_advantages=per_token,
                        pad_value=pad_value, off_policy="old_logprobs" in want, rollout="rollout_logprobs" in want,
                        ref="ref_logprobs" in want, **batch_kwargs)
    if "entropies" not in want:
        return base
    ent = torch.rand(B, T, generator=torch.Generator().manual_seed(1000 + seed), dtype=torch.float64) * 2
    if pad_value is not None:
        ent = torch.where(base.mask, ent, torch.full_like(ent, pad_value))
    return base.replace(entropies=ent.to(dtype).requires_grad_())


def loss_and_grads(obj, batch: pgzoo.TokenBatch):
    """``(out, ∂loss/∂logprobs, ∂loss/∂entropies or None)`` on fresh leaves (``batch`` is not modified)."""
    lp = batch.logprobs.detach().clone().requires_grad_(True)
    ent = batch.entropies.detach().clone().requires_grad_(True) if batch.entropies is not None else None
    out = obj(batch.replace(logprobs=lp, entropies=ent))
    leaves = [lp] + ([ent] if ent is not None else [])
    grads = torch.autograd.grad(out.loss, leaves, allow_unused=True) if out.loss.requires_grad else [None] * 2
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]
    return out, grads[0], (grads[1] if ent is not None else None)


def replace_rows(batch: pgzoo.TokenBatch, rows, **changes) -> pgzoo.TokenBatch:
    """The batch restricted to ``rows`` (an index tensor or slice) of every per-row tensor."""
    values = {"logprobs": batch.logprobs.detach()[rows], "mask": batch.mask[rows],
              "advantages": batch.advantages[rows], "max_tokens": batch.max_tokens}
    for f in (*TOKEN_FIELDS, "entropies"):
        value = getattr(batch, f)
        values[f] = None if value is None else value.detach()[rows]
    if values["entropies"] is not None:
        values["entropies"].requires_grad_()
    values.update(changes)
    return pgzoo.TokenBatch(**values)


def documented_metric_names() -> set[str]:
    """Every backquoted ``family/name`` in docs/metrics.md (table rows may name several, e.g. `a/x`, `a/y`)."""
    doc = (Path(__file__).parents[1] / "docs" / "metrics.md").read_text()
    return set(re.findall(r"`([a-z_]+/[a-z_0-9]+)`", doc))


def assert_one_graph(obj, ref: pgzoo.TokenBatch) -> None:
    """``obj`` on the batch ``ref`` (its non-None fields passed as tensors) traces into one torch.compile graph and
    gives the eager loss, gradient and metrics."""
    torch._dynamo.reset()
    fields = [f for f in (*TOKEN_FIELDS, "entropies") if getattr(ref, f) is not None]

    def step(lp, mask, adv, *tensors):
        batch = pgzoo.TokenBatch(logprobs=lp, mask=mask, advantages=adv, check_values=False,
                                 **dict(zip(fields, tensors)))
        out = obj(batch)
        return out.loss, out.metrics

    # backend="eager": trace only (fast); fullgraph=True turns any graph break into an error
    compiled = torch.compile(step, backend="eager", fullgraph=True)
    args = (ref.mask, ref.advantages, *(getattr(ref, f) for f in fields))  # entropies keep their grad
    lp_c = ref.logprobs.detach().clone().requires_grad_(True)
    lp_e = ref.logprobs.detach().clone().requires_grad_(True)
    loss_c, metrics_c = compiled(lp_c, *args)
    loss_e, metrics_e = step(lp_e, *args)
    loss_c.backward()
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(lp_c.grad, lp_e.grad)
    assert metrics_c.keys() == metrics_e.keys()
    for key in metrics_e:
        torch.testing.assert_close(metrics_c[key], metrics_e[key], msg=key)


class NoHostSync(TorchDispatchMode):
    """Fails on any device-to-host read inside the ``with`` block: Python-level (``.item()``, ``bool()``, ...,
    patched on ``torch.Tensor`` through ``monkeypatch``) and C++-level (``aten._local_scalar_dense``, the op behind
    every scalar read, e.g. tensor-valued indexing). ``ops`` counts the ops seen, so a test can tell it saw the
    objective run."""

    PATCHED = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")

    def __init__(self, monkeypatch):
        super().__init__()
        self.monkeypatch = monkeypatch
        self.ops = 0

    def __enter__(self):
        def sync(*_args, **_kwargs):
            raise AssertionError("host sync inside an objective")

        for attr in self.PATCHED:
            self.monkeypatch.setattr(torch.Tensor, attr, sync)
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self.monkeypatch.undo()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            raise AssertionError("host sync inside an objective (aten._local_scalar_dense)")
        self.ops += 1
        return func(*args, **(kwargs or {}))


def variant_id(variant: tuple[str, dict]) -> str:
    """``("grpo", {"beta": 0.1})`` -> ``grpo+beta=0.1``: the test id of an (objective, options) variant."""
    name, options = variant
    return name + ("+" + "+".join(f"{k}={x}" for k, x in options.items()) if options else "")


def assert_matches_reference(obj, reference, batch_kwargs: dict, *, seeds: int = 3, moves: bool = True,
                             metrics_finite: bool = False) -> None:
    """``obj``'s loss and gradient equal ``reference(obj, batch) -> (loss, grad)`` (a naive token-by-token loop) on
    ``seeds`` random float64 batches ``random_batch(5, 7, seed, **batch_kwargs)``: finite, exactly zero at masked
    positions, to 1e-9; ``moves``: the gradient is not zero everywhere; ``metrics_finite``: every metric detached
    and finite."""
    for seed in range(seeds):
        batch = random_batch(5, 7, seed=seed, **batch_kwargs)
        lp = batch.logprobs.detach().clone().requires_grad_(True)
        out = obj(batch.replace(logprobs=lp))
        (g,) = torch.autograd.grad(out.loss, lp)
        ref_loss, ref_g = reference(obj, batch)
        assert torch.isfinite(out.loss) and torch.isfinite(g).all()
        assert (g[~batch.mask] == 0).all()
        torch.testing.assert_close(out.loss.detach(), ref_loss, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(g, ref_g, rtol=1e-9, atol=1e-12)
        if moves:
            assert g.abs().sum() > 0
        if metrics_finite:
            for key, value in out.metrics.items():
                assert isinstance(value, torch.Tensor) and not value.requires_grad, key
                assert torch.isfinite(value).all(), key


def naive_aggregate(rows: dict, batch: pgzoo.TokenBatch, mode: str, lp: torch.Tensor) -> torch.Tensor:
    """The aggregation formulas of docs/objectives.md, written out: ``rows`` maps a row index to its per-token terms
    (its unmasked tokens' terms, a list of 0-d tensors); normalisers from the batch or counted from its mask."""
    B, T = batch.mask.shape
    n_seq = batch.num_sequences or int((batch.mask.sum(-1) > 0).sum())
    n_tok = batch.num_tokens or int(batch.mask.sum())
    L = batch.max_tokens or T
    total = lp.new_zeros(())
    for terms in rows.values():
        if not terms:
            continue
        s = sum(terms)
        total = total + {"token-mean": s / n_tok, "token-sum": s, "seq-mean-token-sum": s / n_seq,
                         "seq-mean-token-mean": s / len(terms) / n_seq, "constant": s / (n_seq * L)}[mode]
    return total


def naive_gradient(loss, obj, batch: pgzoo.TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, ∂loss/∂logprobs)`` of a naive ``loss(config, batch, lp)``, the gradient zeroed at masked positions (a
    naive loop never reads them, so autograd leaves them unset)."""
    lp = batch.logprobs.detach().clone().requires_grad_(True)
    value = loss(obj.config, batch, lp)
    (g,) = torch.autograd.grad(value, lp, allow_unused=True)
    g = torch.zeros_like(lp) if g is None else g
    return value.detach(), torch.where(batch.mask, g, torch.zeros_like(g))
