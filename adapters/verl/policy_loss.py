"""A pgzoo objective as a verl 0.9.1 policy loss (``register_policy_loss``), the mapping of docs/verl.md.

verl's actor loss (``verl.workers.utils.losses.ppo_loss``) calls the registered loss once per micro-batch as
``fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)`` after filling
``config.global_batch_info`` with the mini-batch's counts over every data-parallel rank; it then adds verl's own
entropy bonus and KL loss. The loss here builds a :class:`pgzoo.TokenBatch` and calls the objective:

========================================  =========================================================================
verl                                      pgzoo
========================================  =========================================================================
``log_prob`` / ``old_log_prob``           ``logprobs`` / ``old_logprobs``
``advantages`` ``[B, T]``                 ``advantages`` (per token)
``response_mask``                         ``mask``
``loss_agg_mode``                         the objective's ``aggregation`` (``seq-mean-token-sum-norm`` = ``constant``)
``global_batch_info["batch_num_tokens"]`` ``num_tokens``
``global_batch_info["global_batch_size"]`` ``num_sequences``
``global_batch_info["loss_scale_factor"]`` ``max_tokens`` (None: the micro-batch width T, as verl)
``global_batch_info["dp_size"]``          the loss times dp_size (verl's data-parallel average divides it again)
``rollout_is_weights`` w                  ``rollout_logprobs = old_log_prob − log w`` (objectives that correct)
``policy_loss.pgzoo`` (a dict)            the objective's options, over pgzoo's defaults
========================================  =========================================================================

Every refusal is a :class:`pgzoo.ConfigError` raised at the first call, naming the verl setting and the fix.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from verl.workers.config import ActorConfig
from verl.workers.config import PolicyLossConfig as VerlPolicyLossConfig

import pgzoo
from pgzoo.adapters.verl.names import AGGREGATION, FIXED_AGGREGATION, PREFIX, RAW_IS_THRESHOLD, CONFIG_TARGET
from pgzoo.errors import ConfigError

log = logging.getLogger(__name__)

ACTOR = "actor_rollout_ref.actor"


@dataclass
class PolicyLossConfig(VerlPolicyLossConfig):
    """verl's policy-loss config plus ``pgzoo``: the objective's options (verl's own class refuses unknown keys, so
    a run that sets options names this class as the config's target)::

        actor_rollout_ref.actor.policy_loss._target_=pgzoo.adapters.verl.policy_loss.PolicyLossConfig
        +actor_rollout_ref.actor.policy_loss.pgzoo.eps_high=0.3
    """

    pgzoo: dict = field(default_factory=dict)


# verl settings read by verl's own policy losses only (ActorConfig, then PolicyLossConfig fields), with the pgzoo
# option that plays the part in the objectives that have one. At verl's default they are taken as unset.
_ACTOR_SETTINGS = {"clip_ratio": "eps_low/eps_high", "clip_ratio_low": "eps_low", "clip_ratio_high": "eps_high",
                   "clip_ratio_c": "clip_c or is_cap", "tau_pos": "temperature_pos", "tau_neg": "temperature_neg"}
_LOSS_SETTINGS = {"clip_cov_ratio": "cov_ratio", "clip_cov_lb": "cov_lb", "clip_cov_ub": "cov_ub",
                  "kl_cov_ratio": "cov_ratio", "ppo_kl_coef": "kl_coef", "dro_beta": "(no pgzoo objective)"}


def _defaults(cls) -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


_ACTOR_DEFAULTS = _defaults(ActorConfig)
_LOSS_DEFAULTS = _defaults(VerlPolicyLossConfig)


def _plain(value: Any) -> Any:
    """A Hydra/OmegaConf container as plain dicts and lists (a Correction is given as a dict)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _options(name: str, config) -> dict[str, Any]:
    policy_loss = config.get("policy_loss", None) if config is not None else None
    options = policy_loss.get("pgzoo", None) if policy_loss is not None else None
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise ConfigError(f"{ACTOR}.policy_loss.pgzoo={options!r} must be a mapping of {PREFIX}{name}'s options, "
                          f"e.g. +{ACTOR}.policy_loss.pgzoo.eps_high=0.3")
    return _plain(options)


@dataclass(frozen=True)
class Plan:
    """What one (objective, verl settings) pair resolves to; built and checked once, at the first call."""

    objective: pgzoo.Objective
    needs_rollout: bool  # recovers rollout_logprobs from verl's rollout_is_weights
    positive_logprob_check: bool  # DPPO reads log-probabilities as probabilities: refuse the ones above 0


def _check_verl_loss_settings(name: str, config) -> None:
    """verl's own loss settings must be at their defaults: a pgzoo objective reads its options from
    ``policy_loss.pgzoo``, so a changed verl setting would otherwise be silently ignored."""
    for key, ours in _ACTOR_SETTINGS.items():
        value = config.get(key, _ACTOR_DEFAULTS.get(key))
        if key in _ACTOR_DEFAULTS and value != _ACTOR_DEFAULTS[key]:
            raise ConfigError(
                f"{ACTOR}.{key}={value!r} is a setting of verl's own policy losses, which {PREFIX}{name} does not "
                f"read: remove it and set the objective's option instead ({ours}: "
                f"+{ACTOR}.policy_loss.pgzoo.<option>=..., with policy_loss._target_={CONFIG_TARGET}); "
                f"see docs/verl.md")
    policy_loss = config.get("policy_loss", None)
    for key, ours in _LOSS_SETTINGS.items():
        value = policy_loss.get(key, _LOSS_DEFAULTS.get(key)) if policy_loss is not None else None
        if key in _LOSS_DEFAULTS and value != _LOSS_DEFAULTS[key]:
            raise ConfigError(
                f"{ACTOR}.policy_loss.{key}={value!r} is a setting of verl's own policy losses, which "
                f"{PREFIX}{name} does not read: remove it and set the objective's option ({ours}) in "
                f"{ACTOR}.policy_loss.pgzoo; see docs/verl.md")


def build_plan(name: str, loss_agg_mode: str, config) -> Plan:
    """The objective ``name`` under verl's settings, or a ConfigError naming the setting it cannot honour."""
    if loss_agg_mode not in AGGREGATION:
        raise ConfigError(f"{ACTOR}.loss_agg_mode={loss_agg_mode!r} is not one of verl's modes "
                          f"({', '.join(AGGREGATION)})")
    if config is None:
        raise ConfigError(f"{PREFIX}{name} needs verl's actor config (the global batch counts live in it): "
                          f"call it through verl.workers.utils.losses.ppo_loss or pass config=ActorConfig(...)")
    _check_verl_loss_settings(name, config)
    options = _options(name, config)
    probe = pgzoo.get(name, **options)  # unknown options or bad values raise here, naming the key
    has_aggregation = hasattr(probe.config, "aggregation")
    if has_aggregation:
        wanted = AGGREGATION[loss_agg_mode]
        if "aggregation" in options and options["aggregation"] != wanted:
            raise ConfigError(
                f"{ACTOR}.policy_loss.pgzoo.aggregation={options['aggregation']!r} contradicts {ACTOR}.loss_agg_mode="
                f"{loss_agg_mode!r} (pgzoo {wanted!r}): verl's loss_agg_mode is the aggregation (it also "
                f"aggregates verl's entropy and KL terms); drop the pgzoo option")
        try:
            objective = pgzoo.get(name, **{**options, "aggregation": wanted})
        except ConfigError as exc:
            raise ConfigError(f"{ACTOR}.loss_agg_mode={loss_agg_mode!r}: {PREFIX}{name} refuses the aggregation "
                              f"{wanted!r} ({exc}); choose another loss_agg_mode") from exc
    else:
        if loss_agg_mode != FIXED_AGGREGATION:
            raise ConfigError(
                f"{ACTOR}.loss_agg_mode={loss_agg_mode!r}: {PREFIX}{name} averages one value per sequence and has "
                f"no aggregation option; set {ACTOR}.loss_agg_mode={FIXED_AGGREGATION} (verl's name for it)")
        objective = probe
    requires = set(objective.requires)
    if "ref_logprobs" in requires and not getattr(objective.config, "beta", 0):
        raise ConfigError(
            f"{PREFIX}{name} needs the reference policy's log-probs in its own term (not only in a KL penalty), but "
            f"verl hands them to its own KL loss only, never to a policy loss: run {name} with pgzoo's trainer "
            f"(pgzoo train) or another trainer that passes ref_logprobs (docs/verl.md)")
    if "ref_logprobs" in requires:
        raise ConfigError(
            f"{PREFIX}{name} with these options has a KL term (beta > 0), but verl hands the reference log-probs "
            f"to its own KL loss only: drop beta from {ACTOR}.policy_loss.pgzoo and set {ACTOR}.use_kl_loss=true, "
            f"{ACTOR}.kl_loss_coef=<beta>, {ACTOR}.kl_loss_type=low_var_kl (docs/verl.md: verl's low_var_kl is "
            f"pgzoo's low-var-k3 clamped to ±10, aggregated with loss_agg_mode)")
    if "entropies" in requires:
        raise ConfigError(
            f"{PREFIX}{name} with these options needs per-token entropies (entropy_coef or top_entropy_quantile), "
            f"which verl does not hand to a policy loss: drop them from {ACTOR}.policy_loss.pgzoo; for an entropy "
            f"bonus set {ACTOR}.entropy_coeff (verl aggregates it with loss_agg_mode, pgzoo by the token mean)")
    unknown = requires - {"rollout_logprobs", "old_logprobs"}
    if unknown:
        raise ConfigError(f"{PREFIX}{name} requires {', '.join(sorted(unknown))}, which verl does not hand to a "
                          f"policy loss")
    log.info("%s%s under verl (loss_agg_mode=%s): %r", PREFIX, name, loss_agg_mode, objective)
    return Plan(objective=objective, needs_rollout="rollout_logprobs" in requires,
                positive_logprob_check=getattr(objective.config, "divergence", None) is not None)


_PLANS: dict[tuple, Plan] = {}


def _plan(name: str, loss_agg_mode: str, config) -> Plan:
    key_parts = (name, loss_agg_mode, repr(sorted(_options(name, config).items())) if config is not None else None,
                 tuple(repr(config.get(k, None)) for k in _ACTOR_SETTINGS) if config is not None else None,
                 repr(config.get("policy_loss", None)) if config is not None else None)
    if key_parts not in _PLANS:
        _PLANS[key_parts] = build_plan(name, loss_agg_mode, config)
    return _PLANS[key_parts]


def _count(value, what: str, *, dp_size: int, needed: bool):
    """A global count of ``global_batch_info`` (None: this micro-batch's own count, as verl's agg_loss)."""
    if value is None:
        if needed and dp_size > 1:
            raise ConfigError(f"config.global_batch_info[{what!r}] is None with dp_size={dp_size}: the normaliser "
                              f"must be the count over every rank (verl's actor fills it in ppo_loss)")
        return None
    if isinstance(value, torch.Tensor):
        value = value.detach()
    return value


def make_policy_loss(name: str):
    """verl's policy-loss function for the pgzoo objective ``name`` (registered as ``pgzoo/<name>``)."""

    def policy_loss(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                    response_mask: torch.Tensor, loss_agg_mode: str = "token-mean", config=None,
                    rollout_is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        plan = _plan(name, loss_agg_mode, config)
        mask = response_mask.to(torch.bool)
        info = dict(config.get("global_batch_info", None) or {})
        dp_size = int(info.get("dp_size", 1) or 1)
        mode = AGGREGATION[loss_agg_mode]
        num_tokens = _count(info.get("batch_num_tokens"), "batch_num_tokens", dp_size=dp_size,
                            needed=mode == "token-mean")
        num_sequences = _count(info.get("global_batch_size"), "global_batch_size", dp_size=dp_size,
                               needed=mode in ("seq-mean-token-sum", "seq-mean-token-mean", "constant"))
        max_tokens = info.get("loss_scale_factor", None)
        old = old_log_prob.detach()
        rollout = None
        if rollout_is_weights is not None:
            if not plan.needs_rollout:
                raise ConfigError(
                    f"verl hands over rollout_is_weights (algorithm.rollout_correction.rollout_is is set), but "
                    f"{PREFIX}{name} has no training-inference correction configured and would ignore them: set "
                    f"algorithm.rollout_correction.rollout_is=null, or configure the objective's correction in "
                    f"{ACTOR}.policy_loss.pgzoo (e.g. correction: {{level: token, mode: truncate, cap: 2.0}}) with "
                    f"rollout_is=token and rollout_is_threshold={RAW_IS_THRESHOLD:g}")
            w = rollout_is_weights.detach().to(old.dtype)
            bad = (mask & ~(torch.isfinite(w) & (w > 0))).any()
            if bool(bad):
                raise ConfigError(
                    "rollout_is_weights holds a zero or non-finite weight at a response token: pgzoo recovers the "
                    "rollout log-probs as old_log_prob - log(w), so verl must hand over the raw token ratios: set "
                    f"algorithm.rollout_correction.rollout_is=token, rollout_is_threshold={RAW_IS_THRESHOLD:g} (one "
                    "number, not IcePop's lower_upper) and rollout_is_batch_normalize=false; pgzoo's own correction "
                    "(is_cap, correction) then truncates or masks")
            # log w = old − rollout exactly when verl's weight is the raw token ratio (docs/verl.md)
            rollout = torch.where(mask, old - torch.log(torch.where(mask, w, 1.0)), old)
        elif plan.needs_rollout:
            raise ConfigError(
                f"{PREFIX}{name} corrects the training-inference mismatch and needs the rollout log-probs, which "
                f"verl hands to a policy loss only as rollout_is_weights: set "
                f"actor_rollout_ref.rollout.calculate_log_probs=true, algorithm.rollout_correction.rollout_is=token, "
                f"rollout_is_threshold={RAW_IS_THRESHOLD:g}, bypass_mode=false; or use an objective without the "
                f"correction (e.g. {PREFIX}minirl-no-is)")
        if plan.positive_logprob_check:
            above = (mask & ((log_prob.detach() > 0) | (old > 0))).any()
            if bool(above):
                raise ConfigError(
                    f"{PREFIX}{name}: a log-probability above 0 at a response token. pgzoo's DPPO reads it as 0 "
                    f"(a probability of 1), verl's dppo losses exponentiate it as given; the two would differ, and "
                    f"pgzoo has no option for verl's reading. Check the log-probs (a log-softmax is never above 0)")
        batch = pgzoo.TokenBatch(
            logprobs=log_prob, mask=mask, advantages=advantages.detach(), old_logprobs=old, rollout_logprobs=rollout,
            num_sequences=num_sequences, num_tokens=num_tokens, max_tokens=max_tokens)
        out = plan.objective(batch)
        # verl averages each rank's gradient over dp_size ranks; its agg_loss multiplies by dp_size to undo that
        loss = out.loss * dp_size if dp_size != 1 else out.loss
        names = list(out.metrics)
        values = torch.stack([out.metrics[k].detach().float().reshape(()) for k in names]).tolist() if names else []
        return loss, {f"{PREFIX}{k}": v for k, v in zip(names, values)}

    policy_loss.__name__ = f"pgzoo_{name.replace('-', '_')}_policy_loss"
    policy_loss.__qualname__ = policy_loss.__name__
    policy_loss.__doc__ = f"pgzoo's {name!r} objective as a verl policy loss ({PREFIX}{name}); see docs/verl.md."
    return policy_loss


__all__ = ["PolicyLossConfig", "Plan", "build_plan", "make_policy_loss"]
