"""Divergence guards of the training loop (``train.stop_on``): a run that has gone wrong stops, loudly.

Checked after every global step on the step's metrics row (the same numbers metrics.csv records):

- ``nonfinite``: ``loss`` or ``grad_norm`` is NaN or ±inf — the update was poisoned; the optimizer state that
  produced it would only carry the NaN forward.
- ``entropy_below``: the mean token entropy H = -Σ_v π(v) log π(v) (nats, averaged over the step's response
  tokens) fell below the threshold — the policy collapsed to a deterministic one and samples no longer explore,
  so group-relative advantages vanish (the "entropy collapse" of DAPO, Yu et al. 2025, arXiv:2503.14476).
- ``entropy_uniform``: H rose above that fraction of ln |V|, the entropy of the uniform distribution over the
  vocabulary — the policy was destroyed (a randomly initialised tiny MoE starts near 0.994 ln |V|; a trained one
  far below).

The guard raises :class:`Diverged` inside the step, before the step's checkpoint is written, so the newest
checkpoint on disk is one from before the problem. Relax it per key (``train.stop_on.nonfinite=false``,
``train.stop_on.entropy_below=null``).
"""

from __future__ import annotations

import math

from pgzoo.errors import PgzooError


class Diverged(PgzooError, RuntimeError):
    """The run diverged (``train.stop_on``): non-finite loss or gradient norm, or an entropy collapse."""


def check_step(row: dict[str, float], stop_on, step: int, vocab_size: int | None) -> None:
    """Raise :class:`Diverged` when the metrics ``row`` of global step ``step`` trips a ``stop_on`` guard."""
    if stop_on.nonfinite:
        bad = [k for k in ("loss", "grad_norm") if k in row and not math.isfinite(row[k])]
        if bad:
            raise Diverged(f"step {step}: {' and '.join(f'{k}={row[k]}' for k in bad)} (train.stop_on.nonfinite); "
                           f"lower train.lr, set train.grad_clip, or check the rewards and the objective's options; "
                           f"train.stop_on.nonfinite=false lets the run go on")
    ent = row.get("entropy/mean")
    if ent is None or not math.isfinite(ent):
        return
    if stop_on.entropy_below is not None and ent < stop_on.entropy_below:
        raise Diverged(f"step {step}: the mean token entropy {ent:.3g} nats fell below train.stop_on.entropy_below="
                       f"{stop_on.entropy_below:g} (the policy collapsed to deterministic outputs); raise the rollout "
                       f"temperature or lower train.lr, or relax it with train.stop_on.entropy_below=null")
    if stop_on.entropy_uniform is not None and vocab_size and vocab_size > 1:
        top = math.log(vocab_size)
        if ent > stop_on.entropy_uniform * top:
            raise Diverged(f"step {step}: the mean token entropy {ent:.4g} nats is {ent / top:.4f} of ln(vocabulary)"
                           f"={top:.4g}, above train.stop_on.entropy_uniform={stop_on.entropy_uniform:g} (the policy "
                           f"collapsed to uniform outputs); lower train.lr, or relax it with "
                           f"train.stop_on.entropy_uniform=null")


__all__ = ["Diverged", "check_step"]
