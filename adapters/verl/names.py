"""verl 0.9.1's names for pgzoo's settings, and the recipe export (``pgzoo recipe export --to verl``).

Nothing here imports verl: the export runs where verl is not installed. The loss itself is in
:mod:`pgzoo.adapters.verl.policy_loss`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pgzoo
from pgzoo.errors import ConfigError

PREFIX = "pgzoo/"  # verl's own names have no slash: a prefixed name never shadows one of them

# verl's ``actor.loss_agg_mode`` -> pgzoo's aggregation (pgzoo.aggregate); one to one, one renamed.
AGGREGATION = {
    "token-mean": "token-mean",
    "token-sum": "token-sum",
    "seq-mean-token-sum": "seq-mean-token-sum",
    "seq-mean-token-mean": "seq-mean-token-mean",
    "seq-mean-token-sum-norm": "constant",
}
VERL_AGGREGATION = {pgzoo_mode: verl_mode for verl_mode, pgzoo_mode in AGGREGATION.items()}
# An objective without an ``aggregation`` option reduces one value per sequence (pgzoo's ``seq-mean``: GSPO, GMPO):
# for a term constant along each row that is verl's ``seq-mean-token-mean`` (the mean over a row's tokens is the
# row's value), the one verl mode it honours.
FIXED_AGGREGATION = "seq-mean-token-mean"

# pgzoo estimator -> (verl adv_estimator, extra verl overrides): the same advantages (tests/test_advantages.py and
# tests/test_verl_estimators.py compare them on the same tensors). Estimators not listed here are registered in
# verl as ``pgzoo/<name>`` by the plugin.
VERL_ESTIMATOR = {
    "group-mean": ("grpo", {"algorithm.norm_adv_by_std_in_grpo": False}),
    "group-mean-std": ("grpo", {}),
    "leave-one-out": ("rloo", {}),
    "rloo": ("rloo", {}),
    "reinforce++": ("reinforce_plus_plus", {"algorithm.gamma": 1.0}),
    "reinforce++-baseline": ("reinforce_plus_plus_baseline", {}),
    "opo": ("opo", {}),
    "gpg": ("gpg", {}),
    "grpo-passk": ("grpo_passk", {}),
    "gdpo": ("gdpo", {}),
    "remax": ("remax", {}),
    "optimal-token-baseline": ("optimal_token_baseline", {"actor_rollout_ref.actor.calculate_sum_pi_squared": True}),
}
# pgzoo estimator option -> the verl setting that carries it, for the estimators verl runs under its own name
VERL_ESTIMATOR_OPTION = {
    ("reinforce++", "gamma"): "algorithm.gamma",
}
# a per-token input of pgzoo's estimators -> the keyword verl passes it under
VERL_TOKEN_INPUT = {"old_logprobs": "old_log_probs", "sum_pi_squared": "sum_pi_squared",
                    "rollout_is_weights": "rollout_is_weights"}

# The policy-loss config class that carries the ``pgzoo`` options dict (verl's PolicyLossConfig refuses extra keys).
CONFIG_TARGET = "pgzoo.adapters.verl.policy_loss.PolicyLossConfig"
# A verl IS threshold no token ratio reaches: verl clamps log-ratios at ±20 (exp(20) ≈ 4.9e8) before it truncates,
# so with this threshold the weights it hands over are the raw ratios pgzoo recovers the rollout log-probs from.
RAW_IS_THRESHOLD = 1.0e9


def loss_name(objective: str) -> str:
    return PREFIX + objective


def verl_aggregation(objective: pgzoo.Objective) -> str:
    """The verl ``loss_agg_mode`` under which ``objective`` computes what pgzoo computes with its own settings."""
    mode = getattr(objective.config, "aggregation", None)
    return FIXED_AGGREGATION if mode is None else VERL_AGGREGATION[mode]


def _value(v: Any) -> str:
    """A value as a Hydra override writes it."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{_value(x)}" for k, x in v.items()) + "}"
    return str(v)


def recipe_overrides(recipe) -> tuple[list[str], list[str]]:
    """verl overrides for a pgzoo recipe's objective, advantage, rollout and routing replay: ``(overrides, rest)``,
    ``rest`` naming each recipe setting that has no verl equivalent here (set verl's own for those)."""
    obj_section, rollout, train = recipe.objective, recipe.rollout, recipe.train
    options = dict(obj_section.options)
    objective = pgzoo.get(obj_section.name, **options)
    defaults = pgzoo.get(obj_section.name).config
    out = [f"actor_rollout_ref.actor.policy_loss.loss_mode={loss_name(obj_section.name)}",
           f"actor_rollout_ref.actor.loss_agg_mode={verl_aggregation(objective)}"]
    changed = {f.name: getattr(objective.config, f.name) for f in dataclasses.fields(objective.config)
               if f.name != "aggregation" and getattr(objective.config, f.name) != getattr(defaults, f.name)}
    if changed:
        out.append(f"actor_rollout_ref.actor.policy_loss._target_={CONFIG_TARGET}")
        for key, value in changed.items():
            if dataclasses.is_dataclass(value):  # a Correction: its fields as a dict
                value = dataclasses.asdict(value)
            out.append(f"+actor_rollout_ref.actor.policy_loss.pgzoo.{key}={_value(value)}")
    if "rollout_logprobs" in objective.requires:
        out += ["actor_rollout_ref.rollout.calculate_log_probs=true",
                "algorithm.rollout_correction.rollout_is=token",
                f"algorithm.rollout_correction.rollout_is_threshold={RAW_IS_THRESHOLD:.1f}",
                "algorithm.rollout_correction.bypass_mode=false"]
    estimator = obj_section.advantage or objective.default_advantage
    rest: list[str] = []
    estimator_options = dict(obj_section.advantage_options)
    if estimator in VERL_ESTIMATOR:
        name, extra = VERL_ESTIMATOR[estimator]
        extra = dict(extra)
        for key, value in estimator_options.items():
            setting = VERL_ESTIMATOR_OPTION.get((estimator, key))
            if setting is None:
                rest.append(f"objective.advantage_options.{key}={_value(value)} (verl's {name} has no setting for it)")
            else:
                extra[setting] = value
        out.append(f"algorithm.adv_estimator={name}")
        out += [f"{k}={_value(v)}" for k, v in extra.items()]
    else:
        out.append(f"algorithm.adv_estimator={PREFIX}{estimator}")
        out += [f"+algorithm.pgzoo.{k}={_value(v)}" for k, v in estimator_options.items()]
    if rollout.engine in ("vllm", "sglang"):
        out.append(f"actor_rollout_ref.rollout.name={rollout.engine}")
    else:
        rest.append(f"rollout.engine={rollout.engine} (verl's rollout engines are vllm and sglang)")
    out += [f"data.train_batch_size={rollout.prompts_per_step}",
            f"actor_rollout_ref.rollout.n={rollout.group_size}",
            f"data.max_response_length={rollout.max_new_tokens}",
            f"actor_rollout_ref.rollout.temperature={rollout.temperature}",
            f"actor_rollout_ref.rollout.top_p={rollout.top_p}",
            f"actor_rollout_ref.rollout.dtype={rollout.dtype}",
            f"actor_rollout_ref.rollout.gpu_memory_utilization={rollout.gpu_memory_utilization}"]
    if rollout.max_model_len is not None:
        out.append(f"actor_rollout_ref.rollout.max_model_len={rollout.max_model_len}")
    if getattr(rollout, "fp8", False):
        out.append("actor_rollout_ref.rollout.quantization=fp8")
    # verl's mini-batch counts prompts (it multiplies by rollout.n): N optimizer steps per global step
    if rollout.prompts_per_step % train.num_minibatches:
        raise ConfigError(f"train.num_minibatches={train.num_minibatches} does not divide rollout.prompts_per_step="
                          f"{rollout.prompts_per_step}: verl's ppo_mini_batch_size must be a whole number of prompts")
    out.append(f"actor_rollout_ref.actor.ppo_mini_batch_size={rollout.prompts_per_step // train.num_minibatches}")
    if train.routing_replay is not None:
        # verl replays routes on its Megatron (and VeOmni) engine only (docs/verl.md, Routing replay)
        out.append(f"actor_rollout_ref.actor.megatron.router_replay.mode={train.routing_replay}")
        rest.append(f"train.routing_replay={train.routing_replay}: verl replays routes on its Megatron engine: run "
                    f"verl with --config-name=ppo_megatron_trainer")
        if train.routing_replay == "R3":
            out.append("actor_rollout_ref.rollout.enable_rollout_routing_replay=true")
    for key in ("logprobs", "verify_sync", "sync_bucket_mb", "router_dtype"):
        if key in type(rollout).model_fields and getattr(rollout, key) != type(rollout).model_fields[key].default:
            rest.append(f"rollout.{key}={getattr(rollout, key)}")
    rest += ["model, task, train (but num_minibatches and routing_replay), eval and output: set verl's own "
             "(actor_rollout_ref.model.path, data.train_files, actor_rollout_ref.actor.optim.lr, trainer.*)"]
    return out, rest


__all__ = ["PREFIX", "AGGREGATION", "FIXED_AGGREGATION", "VERL_ESTIMATOR", "VERL_ESTIMATOR_OPTION", "VERL_TOKEN_INPUT", "CONFIG_TARGET", "RAW_IS_THRESHOLD",
           "loss_name", "verl_aggregation", "recipe_overrides"]
