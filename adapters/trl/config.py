"""TRL ``GRPOConfig`` / ``AsyncGRPOConfig`` loss settings ↔ pgzoo objective options (no TRL import: any object with
TRL's attributes). ``objective_for_async`` is ``AsyncGRPOTrainer``'s: TRL's async loss is PPO clip over a token mean
whose only settings are ``epsilon``/``epsilon_high``.

    from pgzoo.adapters.trl.config import objective_from_trl, apply_trl_settings, objective_for

    objective_from_trl(GRPOConfig(loss_type="sapo", top_entropy_quantile=0.2))   # TRL's loss as a pgzoo objective
    apply_trl_settings(pgzoo.get("grpo"), GRPOConfig(delta=4.0))              # TRL's shaping on a given objective
    objective_for("minirl", GRPOConfig(delta=4.0))     # GRPOTrainer(loss="minirl", args=...)'s objective: both above

=============================  ====================================================================================
TRL (``GRPOConfig``)           pgzoo
=============================  ====================================================================================
``loss_type``                  objective name: grpo, bnpo, dr_grpo → dr-grpo, dapo, cispo, sapo, luspo, vespo
``epsilon``, ``epsilon_high``  ``eps_low``, ``eps_high`` (``cispo``: TRL's ε_high is the cap: ``eps_high`` = ε_high − 1,
                               no lower bound)
``delta``                      ``delta`` (PPO-clip family)
``importance_sampling_level``  ``importance_sampling_level`` (PPO-clip family, ``cispo``, ``sapo``)
``sapo_temperature_pos/neg``   ``temperature_pos``, ``temperature_neg``
``vespo_k_pos`` ... ``_neg``   ``k_pos``, ``lambda_pos``, ``k_neg``, ``lambda_neg``
``beta``                       ``beta`` (estimator ``kl="k3"``, TRL's)
``use_bias_correction_kl``     ``bias_correction_kl`` (with β ≠ 0)
``top_entropy_quantile``       ``top_entropy_quantile``
``off_policy_mask_threshold``  ``off_policy_mask_threshold``
``entropy_coef``               ``entropy_coef``
``use_adaptive_entropy``       not offered (raises): pgzoo's entropy coefficient is static
=============================  ====================================================================================

Normalisers are not settings: TRL's per-loss-type denominators are pgzoo aggregations fed with explicit counts
(the adapter passes the optimizer step's global counts; see docs/trl.md).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import pgzoo
from pgzoo.errors import ConfigError, UnknownNameError
from pgzoo.objectives.base import Objective

logger = logging.getLogger(__name__)

LOSS_TYPES = {"grpo": "grpo", "bnpo": "bnpo", "dr_grpo": "dr-grpo", "dapo": "dapo", "cispo": "cispo",
              "sapo": "sapo", "luspo": "luspo", "vespo": "vespo"}
PPO_CLIP = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
# TRL setting -> (pgzoo option, TRL's neutral value): the loss-shaping switches every loss type takes in TRL
SHAPING = {
    "top_entropy_quantile": ("top_entropy_quantile", 1.0),
    "off_policy_mask_threshold": ("off_policy_mask_threshold", None),
    "entropy_coef": ("entropy_coef", 0.0),
    "delta": ("delta", None),
    "importance_sampling_level": ("importance_sampling_level", "token"),
}


def _fields(obj_or_cls) -> set[str]:
    cfg = obj_or_cls.Config if isinstance(obj_or_cls, type) else type(obj_or_cls.config)
    return {f.name for f in dataclasses.fields(cfg)}


def trl_options(args: Any) -> tuple[str, dict[str, Any]]:
    """``(objective name, options)`` equivalent to TRL's loss for ``args`` (a ``GRPOConfig``).

    Raises ConfigError for a setting pgzoo does not offer, naming it.
    """
    lt = args.loss_type
    if lt not in LOSS_TYPES:
        raise ConfigError(f"GRPOConfig.loss_type={lt!r} is not one of TRL's {', '.join(LOSS_TYPES)}")
    name = LOSS_TYPES[lt]
    eps_low = args.epsilon
    eps_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    level = args.importance_sampling_level
    opts: dict[str, Any] = {}
    if lt in PPO_CLIP:
        opts.update(eps_low=eps_low, eps_high=eps_high, importance_sampling_level=level)
        if args.delta is not None:
            opts["delta"] = args.delta
    elif lt == "cispo":
        if eps_high < 1:
            raise ConfigError(f"GRPOConfig.epsilon_high={eps_high!r} is CISPO's weight cap in TRL and must be >= 1 "
                              "for pgzoo's cispo (eps_high = cap − 1); ScaleRL recommends epsilon_high=5.0")
        opts.update(eps_low=None, eps_high=eps_high - 1.0, importance_sampling_level=level)
    elif lt == "sapo":
        opts.update(temperature_pos=args.sapo_temperature_pos, temperature_neg=args.sapo_temperature_neg,
                    importance_sampling_level=level)
    else:  # vespo: sequence weights by construction
        opts.update(k_pos=args.vespo_k_pos, lambda_pos=args.vespo_lambda_pos, k_neg=args.vespo_k_neg,
                    lambda_neg=args.vespo_lambda_neg)
        if level != "token" and args.beta != 0 and args.use_bias_correction_kl:
            raise ConfigError("GRPOConfig.importance_sampling_level='sequence' with loss_type='vespo' only changes "
                              "the ratio of the bias-corrected KL term, which pgzoo's vespo takes per token; set "
                              "importance_sampling_level='token' (TRL's recommendation for vespo)")
    if args.delta is not None and lt not in PPO_CLIP:
        logger.warning("GRPOConfig.delta=%r has no effect with loss_type=%r (TRL applies it to the PPO-clip loss "
                       "types only); ignored", args.delta, lt)
    if getattr(args, "use_adaptive_entropy", False):
        raise ConfigError("GRPOConfig.use_adaptive_entropy=True is not offered by pgzoo objectives (their "
                          "entropy_coef is static); set use_adaptive_entropy=False and a fixed entropy_coef")
    opts["beta"] = args.beta
    if args.beta != 0:
        opts["bias_correction_kl"] = bool(args.use_bias_correction_kl)
    for key in ("top_entropy_quantile", "off_policy_mask_threshold", "entropy_coef"):
        opts[key] = getattr(args, key)
    return name, opts


def objective_from_trl(args: Any, **kwargs: Any) -> Objective:
    """The pgzoo objective whose loss is TRL's for ``args`` (``kwargs``: e.g. ``metrics=False``)."""
    name, opts = trl_options(args)
    return pgzoo.get(name, **opts, **kwargs)


def with_options(objective: Objective, **changes: Any) -> Objective:
    """A copy of ``objective`` with some config options changed (validated again)."""
    values = {f.name: getattr(objective.config, f.name) for f in dataclasses.fields(objective.config)}
    values.update(changes)
    return type(objective)(objective.name, default_advantage=objective.default_advantage, paper=objective.paper,
                           metrics=objective.report_metrics, **values)


def _registered_default(objective: Objective, option: str) -> Any:
    try:
        return getattr(pgzoo.get(objective.name).config, option)
    except UnknownNameError:  # a class used without registration: its dataclass default
        field = {f.name: f for f in dataclasses.fields(objective.config)}[option]
        return field.default


def apply_trl_settings(objective: Objective, args: Any) -> Objective:
    """``objective`` with ``args``' non-neutral loss-shaping settings (and β) mapped onto its options.

    A setting maps when the objective has the option and leaves it at its default; an option the objective sets to
    another value, or lacks, raises ConfigError naming the option to use. ``loss_type``, ``epsilon`` and
    ``epsilon_high`` are the objective's own (its name and ``eps_low``/``eps_high``) and are not mapped.
    """
    fields = _fields(objective)
    changes: dict[str, Any] = {}
    wanted = {key: (opt, getattr(args, key), neutral) for key, (opt, neutral) in SHAPING.items()}
    if args.beta != 0:
        wanted["beta"] = ("beta", args.beta, 0.0)
        wanted["use_bias_correction_kl"] = ("bias_correction_kl", bool(args.use_bias_correction_kl), None)
    if getattr(args, "use_adaptive_entropy", False):
        raise ConfigError("GRPOConfig.use_adaptive_entropy=True is not offered by pgzoo objectives (their "
                          "entropy_coef is static); set use_adaptive_entropy=False and pass entropy_coef")
    for key, (opt, value, neutral) in wanted.items():
        if value == neutral:
            continue
        if opt not in fields:
            having = [n for n in pgzoo.available() if opt in _fields(type(pgzoo.get(n)))]
            raise ConfigError(
                f"GRPOConfig.{key}={value!r} shapes the loss, but objective {objective.name!r} has no option "
                f"{opt!r}; use an objective that has it ({', '.join(having)}), e.g. pgzoo.get({having[0]!r}, "
                f"{opt}={value!r}), or leave GRPOConfig.{key} at {neutral!r}")
        current = getattr(objective.config, opt)
        if current == value:
            continue
        if key == "use_bias_correction_kl" and objective.config.beta != 0:
            continue  # the objective's own KL settings (its β is set) win; only a β mapped from TRL brings TRL's
        if current != _registered_default(objective, opt):
            raise ConfigError(
                f"GRPOConfig.{key}={value!r} but objective {objective.name!r} has {opt}={current!r}: set the value "
                f"in one place (the objective's option {opt!r}, or GRPOConfig.{key})")
        changes[opt] = value
    if not changes:
        return objective
    logger.info("objective %r takes TRL's settings %s", objective.name, changes)
    return with_options(objective, **changes)


def resolve_loss(loss: Any, trainer: str) -> Objective:
    """``loss`` as an objective: an objective itself, or a registered name (``trainer`` names the caller)."""
    if isinstance(loss, str):
        loss = pgzoo.get(loss)
    if not isinstance(loss, Objective):
        raise ConfigError(
            f"{trainer}(loss=...) takes a pgzoo objective or its name, got {type(loss).__name__}; "
            f"e.g. loss=pgzoo.get('minirl') or loss='grpo' (available: {', '.join(pgzoo.available())})"
        )
    return loss


def objective_for(loss: Any, config: Any) -> Objective:
    """The objective for ``GRPOTrainer(loss=..., args=config)``: ``loss`` (an objective or its name) with the
    config's loss-shaping settings mapped onto it, or, for ``loss=None``, TRL's own ``loss_type`` as an objective."""
    if loss is None:
        if config is None:
            raise ConfigError("GRPOTrainer needs loss=pgzoo.get(...) or args=GRPOConfig(loss_type=...) to take "
                              "TRL's loss as a pgzoo objective")
        return objective_from_trl(config)
    loss = resolve_loss(loss, "GRPOTrainer")
    if config is None:
        return loss
    loss_type = getattr(config, "loss_type", "dapo")
    if loss_type != "dapo" and LOSS_TYPES.get(loss_type) != loss.name:  # "dapo" is TRL's default: not a choice
        raise ConfigError(
            f"GRPOConfig.loss_type={loss_type!r} but loss={loss.name!r}: the loss is the objective. Pass "
            f"loss=pgzoo.get({LOSS_TYPES.get(loss_type, loss_type)!r}) or leave loss=None to take TRL's loss_type "
            "as a pgzoo objective"
        )
    return apply_trl_settings(loss, config)


# TRL's AsyncGRPOConfig: its loss is PPO clip with a token mean; its only loss settings are the clip range.
ASYNC_CLIP = {"epsilon": ("eps_low", 0.2), "epsilon_high": ("eps_high", None)}  # setting -> (option, TRL default)


def objective_for_async(loss: Any, config: Any) -> Objective:
    """The objective for ``AsyncGRPOTrainer(loss=..., args=config)`` (``config`` an ``AsyncGRPOConfig`` or None).

    ``loss=None``: TRL's own async loss, PPO clip over a token mean, as pgzoo's ``bnpo`` with ``eps_low`` =
    ``epsilon`` and ``eps_high`` = ``epsilon_high`` (``epsilon`` when unset). An objective or a name: that objective;
    an ``epsilon``/``epsilon_high`` set away from TRL's default must equal the objective's ``eps_low``/``eps_high``,
    otherwise ConfigError asks to set the clip range in one place.
    """
    eps = 0.2 if config is None else config.epsilon
    eps_high = None if config is None else config.epsilon_high
    if loss is None:
        return pgzoo.get("bnpo", eps_low=eps, eps_high=eps if eps_high is None else eps_high)
    objective = resolve_loss(loss, "AsyncGRPOTrainer")
    fields = _fields(objective)
    for key, (option, default) in ASYNC_CLIP.items():
        value = eps if key == "epsilon" else eps_high
        if value == default or (option in fields and getattr(objective.config, option) == value):
            continue
        where = (f"objective {objective.name!r} has {option}={getattr(objective.config, option)!r}"
                 if option in fields else f"objective {objective.name!r} has no clip option {option!r}")
        raise ConfigError(
            f"AsyncGRPOConfig.{key}={value!r} but {where}: the loss is the objective, so set the clip range in one "
            f"place (pgzoo.get({objective.name!r}, {option}=...)) and leave AsyncGRPOConfig.{key} at {default!r}")
    return objective
