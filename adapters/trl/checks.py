"""What the TRL adapters refuse to run, each refusal naming the setting and the fix: a TRL outside the tested range
(the adapters override private methods of TRL's trainers), a ``GRPOConfig`` ``GRPOTrainer`` cannot honour exactly (a
global normaliser it cannot know, a KL β or an importance-sampling ratio that would be applied twice, routing replay
without routes), an objective ``AsyncGRPOTrainer`` cannot feed, and sampler logprobs μ that look degenerate next to
the trained policy's.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from pgzoo.errors import ConfigError, DependencyError, require
from pgzoo.objectives.base import Objective

from pgzoo.adapters.trl.rollout import EngineRollout

logger = logging.getLogger("pgzoo.adapters.trl")  # the adapter's one logger

TESTED_TRL = ((1, 16), (1, 17))  # [lower, upper): the TRL versions this adapter was tested against
ALLOW_UNTESTED_ENV = "PGZOO_ALLOW_UNTESTED_TRL"


def check_trl_version(version: str | None = None) -> None:
    """Raise :class:`~pgzoo.errors.DependencyError` unless ``version`` (default: installed TRL) is in the tested range.

    The adapter overrides private methods of TRL's trainer, so an untested TRL fails loudly instead of training
    with a silently different loss. ``PGZOO_ALLOW_UNTESTED_TRL=1`` skips the check (at your own risk).
    """
    version = version or getattr(require("trl", "trl"), "__version__", "unknown")
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else -1)
    lo, hi = TESTED_TRL
    ok = len(parts) == 2 and lo <= tuple(parts) < hi
    if not ok and os.environ.get(ALLOW_UNTESTED_ENV) != "1":
        raise DependencyError(
            f"pgzoo.adapters.trl is tested with TRL >={lo[0]}.{lo[1]},<{hi[0]}.{hi[1]} but TRL {version} is "
            f"installed. Fix: pip install 'pgzoo[trl]' (pins the tested range), or set {ALLOW_UNTESTED_ENV}=1 to "
            "try an untested version"
        )


def degenerate_rollout_logprobs(mu: torch.Tensor, logprobs: torch.Tensor, mask: torch.Tensor,
                                gap: float = 1.0) -> str | None:
    """Why the sampler's per-token logprobs ``mu`` look degenerate next to the trained policy's ``logprobs`` over the
    ``mask`` tokens, or None. Two failures that otherwise train silently on wrong importance weights: every log μ is
    0 (an engine that returned no logprobs, padded with zeros), or the mean |log μ − log π| exceeds ``gap`` nats
    (the engine samples from another policy: weights not synced, another temperature, tokenizer or chat template;
    a healthy colocated engine is within ~1e-3, bfloat16 within ~1e-1)."""
    m = mask.bool()
    if not bool(m.any()):
        return None
    mu_m, lp_m = mu[m].float(), logprobs[m].float()
    if bool((mu_m == 0).all()):
        return ("every log μ is 0, as if the engine returned no logprobs; return the sampled tokens' logprobs from "
                "rollout_func (the 'logprobs' key), or pass rollout_logprobs='old' when the training model sampled")
    gap_now = float((mu_m - lp_m).abs().mean())
    if gap_now > gap:
        return (f"the mean |log μ − log π| is {gap_now:.3g} nats (above {gap:g}): the engine samples from another "
                f"policy than the one trained; check the weight sync, the sampling temperature and the tokenizer")
    return None


def check_beta(objective: Objective, beta: float) -> None:
    """Raise unless ``GRPOConfig.beta`` equals the objective's β: the KL term is the objective's, and TRL computes
    reference logprobs only when its own β is non-zero."""
    obj_beta = float(getattr(objective.config, "beta", 0.0) or 0.0)
    if "ref_logprobs" in objective.requires and obj_beta == 0:
        raise ConfigError(
            f"objective {objective.name!r} reads the reference policy's logprobs in its own term (not in a KL "
            "penalty), but TRL's GRPOTrainer computes them only for a KL term (GRPOConfig.beta != 0), which this "
            "objective does not have: run it with pgzoo's trainer (pgzoo train), which loads the reference policy")
    if float(beta) != obj_beta:
        raise ConfigError(
            f"GRPOConfig.beta={beta} but objective {objective.name!r} has beta={obj_beta}: the KL term is "
            "the objective's (e.g. pgzoo.get('grpo', beta=0.04)) and TRL computes reference logprobs only when "
            f"GRPOConfig.beta != 0. Set GRPOConfig(beta={obj_beta})"
        )


def check_trainer_settings(trainer: Any) -> None:
    """Raise :class:`~pgzoo.errors.ConfigError` for a setting of ``trainer`` (a built
    :class:`pgzoo.adapters.trl.GRPOTrainer`) that the adapter cannot honour exactly, naming the fix; resolve its
    ``rollout_logprobs=None`` to ``"engine"`` or ``"old"``."""
    a, obj = trainer.args, trainer.objective
    ga, spg = a.gradient_accumulation_steps, a.steps_per_generation
    if (spg * trainer.num_iterations) % ga:
        raise ConfigError(
            f"steps_per_generation·num_iterations = {spg}·{trainer.num_iterations} is not a multiple of "
            f"gradient_accumulation_steps = {ga}: an optimizer step would span rollouts not generated yet, so its "
            "global token/sequence counts are unknown. Set steps_per_generation to a multiple of "
            "gradient_accumulation_steps (TRL's default, steps_per_generation = gradient_accumulation_steps, works)"
        )
    check_beta(obj, a.beta)
    if trainer.advantage != "trl" and trainer.multi_objective_aggregation != "sum_then_normalize":
        raise ConfigError(
            f"GRPOConfig.multi_objective_aggregation={trainer.multi_objective_aggregation!r} normalises each "
            f"reward before summing; the adapter computes {trainer.advantage!r} advantages of the weighted reward "
            "sum. Use multi_objective_aggregation='sum_then_normalize', or advantage='trl' to keep TRL's"
        )

    engine_logprobs = trainer.rollout_func is not None or trainer.use_vllm
    needs_mu = "rollout_logprobs" in obj.requires
    if trainer.rollout_logprobs == "old" and engine_logprobs:
        raise ConfigError(
            "rollout_logprobs='old' substitutes π_θold for the sampler's logprobs, but this trainer samples "
            "with a separate engine (rollout_func or use_vllm) that returns them; drop rollout_logprobs='old'"
        )
    if trainer.rollout_logprobs is None:
        # TRL's transformers generation samples with the training model itself: μ_θold = π_θold exactly.
        use_old = needs_mu and not engine_logprobs
        trainer.rollout_logprobs = "old" if use_old else "engine"
        if use_old:
            logger.info(
                "objective %r needs the sampler's logprobs μ_θold; TRL's transformers generation samples with "
                "the training model, so μ_θold = π_θold and the old logprobs are used (pass "
                "rollout_logprobs='engine' to require an inference engine's logprobs instead)", obj.name)
    if needs_mu and not engine_logprobs and trainer.rollout_logprobs != "old":
        raise ConfigError(
            f"objective {obj.name!r} needs rollout logprobs (μ_θold from the inference engine that sampled the "
            "completions) but TRL's transformers generation returns none and rollout_logprobs='engine' was asked "
            "for. Fix one of: sample with a pgzoo engine "
            "(rollout_func=pgzoo.adapters.trl.EngineRollout(pgzoo.rollout.VLLMEngine(path))); set "
            "GRPOConfig(use_vllm=True); or drop rollout_logprobs='engine' (the default uses π_θold as μ, exact "
            "when the training model itself samples)"
        )
    if trainer.use_vllm and trainer.vllm_importance_sampling_correction:
        if needs_mu:
            logger.warning(
                "GRPOConfig.vllm_importance_sampling_correction is ignored: objective %r applies its own "
                "training-inference weight (it is never applied twice)", obj.name
            )
        else:
            raise ConfigError(
                f"GRPOConfig.vllm_importance_sampling_correction=True, but objective {obj.name!r} owns the "
                "loss and the adapter never applies TRL's ratio. Set vllm_importance_sampling_correction=False, "
                f"and for a correction pass it to the objective: pgzoo.get({obj.name!r}, "
                "correction={'level': 'token', 'mode': 'truncate', 'cap': 2.0})"
            )
    if isinstance(trainer.rollout_func, EngineRollout):
        trainer.rollout_func.check_trainer(trainer)
    if trainer.routing_replay is not None:
        from pgzoo.routing import find_moe_layers

        find_moe_layers(trainer.accelerator.unwrap_model(trainer.model))  # raises naming an unsupported class
        if trainer.tools:
            raise ConfigError("routing_replay with tool calling is not supported (tool tokens carry no routes)")
    if trainer.routing_replay == "R3":
        rf = trainer.rollout_func
        if not isinstance(rf, EngineRollout) or not rf.supports_routes:
            raise ConfigError(
                "routing_replay='R3' replays the rollout engine's routes: pass "
                "rollout_func=pgzoo.adapters.trl.EngineRollout(engine) with an engine whose supports_routes is "
                "True (TransformersEngine; VLLMEngine(..., enable_return_routed_experts=True) on GPU), or use 'R2'"
            )


# What TRL's AsyncGRPOTrainer hands its loss besides π_θ: μ (its "old" log-probs) and the fused head's entropies.
ASYNC_FIELDS = frozenset({"old_logprobs", "rollout_logprobs", "entropies"})


def check_async_objective(objective: Objective) -> None:
    """Raise :class:`~pgzoo.errors.ConfigError` for an objective that needs what TRL's ``AsyncGRPOTrainer`` does not
    compute (a reference model's logprobs for β ≠ 0); warn once when the objective's training–inference factor
    π_θold/μ is inert there, because that trainer's π_θold *is* μ."""
    missing = objective.requires - ASYNC_FIELDS
    if "ref_logprobs" in missing and not getattr(objective.config, "beta", 0):
        raise ConfigError(f"objective {objective.name!r} reads the reference policy's logprobs in its own term, but "
                          "TRL's AsyncGRPOTrainer loads no reference model: run it with pgzoo's trainer (pgzoo train)")
    if "ref_logprobs" in missing:
        raise ConfigError(
            f"objective {objective.name!r} has beta={objective.config.beta}, but TRL's AsyncGRPOTrainer loads no "
            f"reference model, so there are no reference logprobs for its KL term. Set beta=0 "
            f"(pgzoo.get({objective.name!r}, beta=0.0)) or use pgzoo.adapters.trl.GRPOTrainer")
    if missing:
        raise ConfigError(f"objective {objective.name!r} needs {', '.join(sorted(missing))}, which TRL's "
                          "AsyncGRPOTrainer does not compute; use pgzoo.adapters.trl.GRPOTrainer")
    cfg = objective.config
    if getattr(cfg, "train_inference_is", False) or getattr(cfg, "correction", None) is not None:
        logger.warning(
            "objective %r weights by the training-inference factor pi_old/mu, but TRL's AsyncGRPOTrainer uses the "
            "sampler's logprobs mu as pi_old, so that factor is 1 on every token: the ratio pi/mu (staleness and "
            "training-inference mismatch together) is bounded only by the objective's own clip, if it has one",
            objective.name)


__all__ = ["check_trl_version", "degenerate_rollout_logprobs", "check_beta", "check_trainer_settings",
           "check_async_objective", "ASYNC_FIELDS", "TESTED_TRL", "ALLOW_UNTESTED_ENV"]
