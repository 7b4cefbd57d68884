"""What a resumed run may change: a resumed run continues the recipe its checkpoint was trained with.

``pgzoo train RECIPE --resume`` compares the recipe it is given with the one recorded in the checkpoint. Any
difference is refused, naming the keys, because a run whose objective, batch or learning rate changed half-way is
not the run its folder describes. Keys that do not change what the remaining steps compute — how long to train,
how often to checkpoint or evaluate, where to log — may change when the user says so explicitly with
``--allow-change KEY`` (repeatable); each resume that changes something keeps its recipe beside the original
(``recipe.yaml`` is never overwritten).
"""

from __future__ import annotations

from typing import Any

from pgzoo.errors import ConfigError

# Keys a resumed run may change with --allow-change: they decide how long the run goes on and what is recorded
# about it, not what any step computes (a step's prompts and sampling seed depend on the recipe seed and the step).
SAFE_TO_CHANGE = frozenset({
    "train.steps",
    "description",
    "output.checkpoint_every",
    "output.keep_checkpoints",
    "output.loggers",
    "output.plots",
    "output.progress_bar",
    "eval.every",
    "eval.after",
    "eval.num_problems",
    "eval.k",
    "eval.temperature",
    "eval.max_new_tokens",
    "eval.files",
    "rollout.verify_sync",
    # the divergence guards decide only whether the run stops (pgzoo.adapters.lightning.guards)
    "train.stop_on.nonfinite",
    "train.stop_on.entropy_below",
    "train.stop_on.entropy_uniform",
    # torch's intra-op threads: the same arithmetic, at most a different summation order in float reductions
    "train.threads",
    "train.dist_timeout",
    # the bound on dynamic sampling's draws decides only whether a step that needs more draws stops the run: a step
    # that completes drew the same prompts under any bound (pgzoo.adapters.lightning.sampling)
    "rollout.dynamic_sampling.max_draws",
})


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1e-4}}`` -> ``{"train.lr": 1e-4}``; free-form option dicts are compared as whole values
    below their section key (``objective.options``), so an added option is one changed key."""
    if not isinstance(data, dict) or prefix.endswith(("options", "cold_start", "files")):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


# Keys that name where the run lives, not what it is: a run folder moved or copied elsewhere resumes there.
NOT_COMPARED = frozenset({"output.dir"})


def with_defaults(recorded: dict) -> dict:
    """``recorded`` (a recipe dict a run wrote) with every key a later pgzoo added filled with its default: a run
    recorded before a key existed ran with the behaviour its default keeps, so the key did not change. A recorded
    dict the current schema refuses is returned as it is (the comparison then names what differs)."""
    from pgzoo.errors import PgzooError
    from pgzoo.recipes.load import recipe_from_dict

    try:
        return recipe_from_dict(recorded, check=False).model_dump(mode="json")
    except (PgzooError, TypeError, ValueError):
        return recorded


def changed_keys(recorded: dict, given: dict) -> list[str]:
    """Dotted keys whose values differ between two recipe dicts (as :meth:`Recipe.model_dump` writes them), except
    :data:`NOT_COMPARED`; keys added to the schema after ``recorded`` was written count as their defaults."""
    return _differing(flatten(with_defaults(recorded)), flatten(given))


def _differing(a: dict, b: dict) -> list[str]:
    """Keys of two flattened recipes whose values differ, except :data:`NOT_COMPARED`."""
    return sorted(k for k in set(a) | set(b) if k not in NOT_COMPARED and a.get(k, _MISSING) != b.get(k, _MISSING))


_MISSING = object()


def check_resume(recorded: dict, given: dict, allowed: list[str] | tuple[str, ...] = (), *,
                 checkpoint: str = "the checkpoint") -> list[str]:
    """Refuse to resume with a recipe that differs from the ``recorded`` one, except for ``allowed`` keys that are in
    :data:`SAFE_TO_CHANGE`; returns the keys that changed (all allowed)."""
    unsafe = sorted(set(allowed) - SAFE_TO_CHANGE)
    if unsafe:
        raise ConfigError(f"--allow-change {' '.join(unsafe)}: not a key a resumed run may change (they change what "
                          f"the remaining steps compute); keys that may change: {', '.join(sorted(SAFE_TO_CHANGE))}. "
                          f"To change {unsafe[0]}, start a new run with output.dir=runs/another-name")
    a, b = flatten(with_defaults(recorded)), flatten(given)  # the recorded recipe validated once
    changed = _differing(a, b)
    refused = [k for k in changed if k not in allowed]
    if refused:
        detail = "; ".join(f"{k}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}" for k in refused)
        safe = [k for k in refused if k in SAFE_TO_CHANGE]
        fix = (f"pass --allow-change {' --allow-change '.join(safe)} to change {'it' if len(safe) == 1 else 'them'}"
               if safe == refused else
               "resume with the recipe of the run (its recipe.yaml), or start a new run with output.dir=runs/new-name")
        raise ConfigError(f"--resume: the recipe differs from the one {checkpoint} was trained with ({detail}); {fix}")
    return changed
