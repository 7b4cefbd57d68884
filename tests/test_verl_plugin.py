"""pgzoo's objectives inside verl 0.9.1: through verl's own actor loss (``verl.workers.utils.losses.ppo_loss``), every
registered objective gives pgzoo's loss and gradient on the same tensors, under each verl aggregation it accepts and
with verl's global normalisers split over micro-batches and data-parallel ranks; the plugin loads from its entry
point; settings pgzoo cannot honour are refused by name; the conventions that differ are measured (docs/verl.md).

Skipped where verl is not importable (``make install`` installs it without its training stack).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

import pgzoo

pytest.importorskip("verl.trainer.ppo.core_algos", reason="verl 0.9.1 is not installed (`make install` installs it)")
pytest.importorskip("tensordict")

from tensordict import TensorDict  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.config import ActorConfig  # noqa: E402
from verl.workers.utils.losses import ppo_loss  # noqa: E402

from pgzoo.adapters.verl import plugin  # noqa: E402  (registers, as verl's plugin loader does)
from pgzoo.adapters.verl.names import AGGREGATION, FIXED_AGGREGATION  # noqa: E402
from pgzoo.adapters.verl.policy_loss import PolicyLossConfig  # noqa: E402

P = 2  # prompt tokens per row: verl's packed log-probs start one token before the response


# ---------------------------------------------------------------------------------------------- inputs
def make_inputs(seed: int, B: int = 8, T: int = 7):
    g = torch.Generator().manual_seed(seed)
    lp = -(torch.rand(B, T, generator=g, dtype=torch.float64) * 2.0 + 0.05)
    old = (lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).clamp(max=-1e-3)
    rollout = (old + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)).clamp(max=-1e-3)
    lengths = torch.randint(2, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None] < lengths[:, None]
    adv = torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, T) + \
        0.1 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.where(mask, adv, 0.0)
    return lp, old, rollout, adv, mask


def actor_config(loss_mode: str, agg: str, pgzoo_options=None, **actor) -> ActorConfig:
    return ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, loss_agg_mode=agg,
                       policy_loss=PolicyLossConfig(loss_mode=loss_mode, pgzoo=dict(pgzoo_options or {})), **actor)


def verl_call(config, lp, old, adv, mask, rows, *, weights=None, dp_size=1, num_tokens=None, num_sequences=None):
    """verl's ppo_loss on the rows ``rows`` of the batch, its inputs laid out as verl's engine hands them over:
    log-probs packed over prompt + response tokens, response tensors padded, the global counts as non-tensor data.
    Returns the loss, the gradient with respect to the full ``lp`` and the metrics."""
    lp = lp.detach().requires_grad_(True)
    sub = lambda x: x[rows]  # noqa: E731
    B, T = len(rows), lp.shape[1]
    lengths = sub(mask).sum(-1)
    attention = torch.cat([torch.ones(B, P, dtype=torch.long), sub(mask).long()], dim=1)
    flat_index = []
    start = 0
    for i in range(B):
        flat_index += [start + P - 1 + j for j in range(int(lengths[i]))]
        start += P + int(lengths[i])
    packed = torch.zeros(start, dtype=lp.dtype).index_put((torch.tensor(flat_index),), sub(lp)[sub(mask)])
    fields = dict(prompts=torch.ones(B, P, dtype=torch.long), responses=torch.ones(B, T, dtype=torch.long),
                  attention_mask=attention, response_mask=sub(mask).long(),
                  old_log_probs=torch.where(sub(mask), sub(old), 0.0), advantages=sub(adv))
    if weights is not None:
        fields["rollout_is_weights"] = torch.where(sub(mask), sub(weights), 0.0)
    data = TensorDict(fields, batch_size=[B])
    tu.assign_non_tensor(data, dp_size=dp_size, batch_num_tokens=num_tokens, global_batch_size=num_sequences)
    loss, metrics = ppo_loss(config, {"log_probs": packed}, data)
    (grad,) = torch.autograd.grad(loss, lp)
    return loss.detach(), grad, metrics


def pgzoo_call(objective, lp, old, rollout, adv, mask, **normalisers):
    x = lp.detach().requires_grad_(True)
    batch = pgzoo.TokenBatch(logprobs=x, mask=mask, advantages=adv, old_logprobs=old,
                             rollout_logprobs=rollout if "rollout_logprobs" in objective.requires else None,
                             **normalisers)
    out = objective(batch)
    (grad,) = torch.autograd.grad(out.loss, x)
    return out.loss.detach(), grad, out


def accepted_modes(name: str) -> list[str]:
    """verl's aggregation modes the objective accepts: every mode its ``aggregation`` option takes, or verl's name
    for a per-sequence mean when it has none."""
    obj = pgzoo.get(name)
    if not hasattr(obj.config, "aggregation"):
        return [FIXED_AGGREGATION]
    modes = []
    for verl_mode, mode in AGGREGATION.items():
        try:
            pgzoo.get(name, aggregation=mode)
        except pgzoo.ConfigError:
            continue
        modes.append(verl_mode)
    return modes


def direct(name: str, verl_mode: str) -> pgzoo.Objective:
    obj = pgzoo.get(name)
    return pgzoo.get(name, aggregation=AGGREGATION[verl_mode]) if hasattr(obj.config, "aggregation") else obj


def weights_for(name, old, rollout):
    """verl's raw token IS weights π_old/μ, handed over only to the objectives that correct."""
    return torch.exp(old - rollout) if "rollout_logprobs" in pgzoo.get(name).requires else None


# every objective verl can run: those whose own term reads the reference log-probs (A*-PO) are refused by name
REFUSED = [n for n in pgzoo.available() if "ref_logprobs" in pgzoo.get(n).requires]
NAMES = [n for n in pgzoo.available() if n not in REFUSED]
CASES = [(n, m) for n in NAMES for m in accepted_modes(n)]


def test_every_objective_is_registered_under_its_prefixed_name():
    assert sorted(plugin.LOSSES) == sorted(f"pgzoo/{n}" for n in pgzoo.available())
    for name in pgzoo.available():
        assert core_algos.get_policy_loss_fn(f"pgzoo/{name}") is not None
    # verl's own losses are still its own
    assert core_algos.get_policy_loss_fn("vanilla").__module__ == "verl.trainer.ppo.core_algos"


def test_every_objective_accepts_some_mode():
    assert all(accepted_modes(n) for n in NAMES)


# ---------------------------------------------------------------------------------------------- equality
@pytest.mark.parametrize("name,agg", CASES)
def test_through_ppo_loss_equals_pgzoo(name, agg):
    lp, old, rollout, adv, mask = make_inputs(hash(name) % 1000)
    config = actor_config(f"pgzoo/{name}", agg, loss_scale_factor=None)
    rows = list(range(lp.shape[0]))
    lv, gv, metrics = verl_call(config, lp, old, adv, mask, rows, weights=weights_for(name, old, rollout))
    lz, gz, out = pgzoo_call(direct(name, agg), lp, old, rollout, adv, mask)
    torch.testing.assert_close(lv, lz, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gv, gz, rtol=1e-10, atol=1e-12)
    assert gz.abs().sum() > 0
    # metrics come back as verl's do (plain floats), under pgzoo's names
    for key, value in out.metrics.items():
        got = metrics[f"pgzoo/{key}"]  # wrapped by ppo_loss in verl's Metric, averaged over micro-batches
        assert got.values == [pytest.approx(float(value), rel=1e-6, nan_ok=True)]


SHARDABLE = [(n, m) for n, m in CASES if type(pgzoo.get(n)).shard_additive]


@pytest.mark.parametrize("shards,dp_size", [(2, 1), (4, 1), (2, 2), (4, 2)])
@pytest.mark.parametrize("name,agg", SHARDABLE)
def test_micro_batches_sum_to_the_whole_batch(name, agg, shards, dp_size):
    """verl's engine calls the loss per micro-batch with the counts of the whole mini-batch over every rank and
    sums the gradients (FSDP then averages over dp_size ranks): the result is pgzoo's whole-batch gradient."""
    lp, old, rollout, adv, mask = make_inputs(7 + hash(name) % 1000)
    B = lp.shape[0]
    config = actor_config(f"pgzoo/{name}", agg, loss_scale_factor=11)
    num_tokens, num_sequences = int(mask.sum()), B
    weights = weights_for(name, old, rollout)
    total_loss, total_grad = 0.0, torch.zeros_like(lp)
    for part in torch.arange(B).chunk(shards):
        lv, gv, _ = verl_call(config, lp, old, adv, mask, part.tolist(), weights=weights, dp_size=dp_size,
                              num_tokens=num_tokens, num_sequences=num_sequences)
        total_loss, total_grad = total_loss + lv, total_grad + gv
    lz, gz, _ = pgzoo_call(direct(name, agg), lp, old, rollout, adv, mask, max_tokens=11)
    torch.testing.assert_close(total_loss / dp_size, lz, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(total_grad / dp_size, gz, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------- refusals
def _call(name, agg="token-mean", *, weights=False, pgzoo_options=None, **actor):
    lp, old, rollout, adv, mask = make_inputs(1)
    config = actor_config(f"pgzoo/{name}", agg, pgzoo_options, **actor)
    return verl_call(config, lp, old, adv, mask, list(range(lp.shape[0])),
                     weights=torch.exp(old - rollout) if weights else None)


@pytest.mark.parametrize("setting,value", [("clip_ratio_high", 0.28), ("clip_ratio_low", 0.1), ("clip_ratio", 0.3),
                                           ("clip_ratio_c", 10.0), ("tau_pos", 2.0)])
def test_a_changed_verl_loss_setting_is_refused_by_name(setting, value):
    with pytest.raises(pgzoo.ConfigError, match=f"actor_rollout_ref.actor.{setting}={value}"):
        _call("dapo", **{setting: value})


def test_a_changed_verl_policy_loss_setting_is_refused_by_name():
    lp, old, rollout, adv, mask = make_inputs(1)
    config = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1,
                         policy_loss=PolicyLossConfig(loss_mode="pgzoo/clip-cov", clip_cov_ratio=0.1))
    with pytest.raises(pgzoo.ConfigError, match="policy_loss.clip_cov_ratio=0.1"):
        verl_call(config, lp, old, adv, mask, list(range(8)))


def test_options_come_from_the_pgzoo_dict():
    lp, old, rollout, adv, mask = make_inputs(2)
    config = actor_config("pgzoo/dapo", "token-mean", {"eps_high": 0.05, "eps_low": 0.05})
    lv, gv, _ = verl_call(config, lp, old, adv, mask, list(range(8)))
    lz, gz, _ = pgzoo_call(pgzoo.get("dapo", eps_high=0.05, eps_low=0.05), lp, old, rollout, adv, mask)
    torch.testing.assert_close(gv, gz, rtol=1e-10, atol=1e-12)
    _, g_default, _ = pgzoo_call(pgzoo.get("dapo"), lp, old, rollout, adv, mask)
    assert not torch.allclose(gz, g_default)  # the option changed the gradient


def test_an_unknown_option_is_refused_naming_it():
    with pytest.raises(pgzoo.ConfigError, match="eps_hihg"):
        _call("dapo", pgzoo_options={"eps_hihg": 0.3})


def test_an_aggregation_the_objective_refuses_names_loss_agg_mode():
    with pytest.raises(pgzoo.ConfigError, match="loss_agg_mode='token-mean'"):
        _call("gspo", "token-mean")


def test_a_contradicting_pgzoo_aggregation_is_refused():
    with pytest.raises(pgzoo.ConfigError, match="policy_loss.pgzoo.aggregation"):
        _call("grpo", "token-mean", pgzoo_options={"aggregation": "seq-mean-token-sum"})


def test_a_kl_term_is_refused_pointing_to_verls_kl_loss():
    with pytest.raises(pgzoo.ConfigError, match="use_kl_loss=true"):
        _call("grpo", "seq-mean-token-mean", pgzoo_options={"beta": 0.01})


def test_an_objective_reading_reference_logprobs_is_refused():
    assert REFUSED == ["a-star-po", "a2po"]
    with pytest.raises(pgzoo.ConfigError, match="verl hands them to its own KL loss only"):
        _call("a-star-po", FIXED_AGGREGATION)


def test_an_entropy_term_is_refused_pointing_to_verls_entropy_coeff():
    with pytest.raises(pgzoo.ConfigError, match="entropy_coeff"):
        _call("grpo", "seq-mean-token-mean", pgzoo_options={"entropy_coef": 0.01})


def test_missing_rollout_weights_are_refused_for_a_correcting_objective():
    with pytest.raises(pgzoo.ConfigError, match="rollout_is=token"):
        _call("minirl", "seq-mean-token-sum")


def test_weights_an_objective_would_ignore_are_refused():
    with pytest.raises(pgzoo.ConfigError, match="rollout_is=null"):
        _call("grpo", "seq-mean-token-mean", weights=True)


def test_a_correction_from_the_pgzoo_dict_takes_verls_weights():
    lp, old, rollout, adv, mask = make_inputs(3)
    correction = {"level": "token", "mode": "truncate", "cap": 1.5}
    config = actor_config("pgzoo/grpo", "seq-mean-token-mean", {"correction": correction})
    _, gv, _ = verl_call(config, lp, old, adv, mask, list(range(8)), weights=torch.exp(old - rollout))
    _, gz, _ = pgzoo_call(pgzoo.get("grpo", correction=correction), lp, old, rollout, adv, mask)
    torch.testing.assert_close(gv, gz, rtol=1e-10, atol=1e-12)


def test_icepop_zero_weights_are_refused_naming_the_threshold():
    lp, old, rollout, adv, mask = make_inputs(4)
    w = torch.exp(old - rollout)
    w[0, 0] = 0.0
    config = actor_config("pgzoo/minirl", "seq-mean-token-sum")
    with pytest.raises(pgzoo.ConfigError, match="rollout_is_threshold"):
        verl_call(config, lp, old, adv, mask, list(range(8)), weights=w)


def test_dppo_refuses_a_positive_log_probability():
    lp, old, rollout, adv, mask = make_inputs(5)
    lp = lp.clone()
    lp[0, 0] = 0.01
    config = actor_config("pgzoo/dppo-tv", "token-mean")
    with pytest.raises(pgzoo.ConfigError, match="above 0"):
        verl_call(config, lp, old, adv, mask, list(range(8)))


def test_dp_without_global_counts_is_refused():
    lp, old, rollout, adv, mask = make_inputs(6)
    config = actor_config("pgzoo/dapo", "token-mean")
    with pytest.raises(pgzoo.ConfigError, match="batch_num_tokens"):
        verl_call(config, lp, old, adv, mask, list(range(8)), dp_size=2)


# ---------------------------------------------------------------------------------------------- conventions
def test_verls_low_var_kl_is_pgzoos_low_var_k3_clamped_at_10():
    """Measured on the same tensors (docs/verl.md): verl's ``low_var_kl`` (its ``k3``) equals pgzoo's
    ``low-var-k3`` where |log ratio| is small, and both clamp the estimate at 10."""
    lp, old, rollout, adv, mask = make_inputs(8)
    ref = lp.detach() + torch.linspace(-14.0, 3.0, lp.numel(), dtype=lp.dtype).reshape(lp.shape)
    verl_kl = core_algos.kl_penalty(lp, ref, "low_var_kl")
    verl_k3 = core_algos.kl_penalty(lp, ref, "k3")
    torch.testing.assert_close(verl_kl, verl_k3)
    assert float(verl_kl.max()) == 10.0  # verl clamps
    zero = torch.zeros_like(adv)
    obj = pgzoo.get("grpo", beta=1.0, kl="low-var-k3", aggregation="token-mean")
    x = lp.detach().requires_grad_(True)
    out = obj(pgzoo.TokenBatch(logprobs=x, mask=mask, advantages=zero, old_logprobs=lp.detach(), ref_logprobs=ref))
    verl_mean = (verl_kl * mask).sum() / mask.sum()
    torch.testing.assert_close(out.loss.detach(), verl_mean, rtol=1e-10, atol=1e-12)


def test_verl_aggregates_the_entropy_bonus_with_loss_agg_mode():
    """verl's entropy bonus follows ``loss_agg_mode``; pgzoo's ``entropy_coef`` the token mean: they differ under
    the sequence modes (measured here; docs/verl.md)."""
    lp, old, rollout, adv, mask = make_inputs(9)
    entropy = torch.rand_like(lp).requires_grad_(True)
    verl_seq = core_algos.agg_loss(entropy.detach(), mask.double(), "seq-mean-token-mean")
    token_mean = (entropy.detach() * mask).sum() / mask.sum()
    zero = torch.zeros_like(adv)
    x = lp.detach().requires_grad_(True)
    out = pgzoo.get("grpo", entropy_coef=1.0)(pgzoo.TokenBatch(
        logprobs=x, mask=mask, advantages=zero, old_logprobs=lp.detach(), entropies=entropy))
    torch.testing.assert_close(-out.loss.detach(), token_mean, rtol=1e-10, atol=1e-12)
    assert abs(float(verl_seq - token_mean)) > 1e-3


# ---------------------------------------------------------------------------------------------- the entry point
def _fresh(code: str, **env) -> subprocess.CompletedProcess:
    # run outside the repository so that only the installed distribution's entry points are seen
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240,
                          cwd=os.path.dirname(sys.executable), env={**os.environ, **env})


PROBE = ("import verl\nfrom verl.trainer.ppo import core_algos as c\n"
         "print('pgzoo/minirl' in c.POLICY_LOSS_REGISTRY, 'pgzoo/pass-at-k' in c.ADV_ESTIMATOR_REGISTRY)")


POLICIES = {"auto": "True True", "none": "False False", "pgzoo": "True True", "other": "False False"}


@pytest.fixture(scope="module")
def probes():
    """One fresh interpreter per VERL_USE_EXTERNAL_PLUGINS value, all started at once (each imports verl, ray
    included: about 5 s), run outside the repository so that only the installed distribution's entry points count."""
    procs = {policy: subprocess.Popen([sys.executable, "-c", PROBE], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, cwd=os.path.dirname(sys.executable),
                                      env={**os.environ, "VERL_USE_EXTERNAL_PLUGINS": policy})
             for policy in POLICIES}
    out = {}
    for policy, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=240)
        out[policy] = (proc.returncode, stdout, stderr)
    return out


@pytest.mark.slow  # fresh interpreters importing verl
@pytest.mark.parametrize("policy,expected", list(POLICIES.items()))
def test_import_verl_loads_the_plugin_from_its_entry_point(probes, policy, expected):
    """verl reads VERL_USE_EXTERNAL_PLUGINS on import: ``auto`` loads every plugin, ``none`` none, a list only the
    named entry points (pgzoo's is named ``pgzoo``)."""
    returncode, stdout, stderr = probes[policy]
    assert returncode == 0, stderr[-2000:]
    assert stdout.strip().splitlines()[-1] == expected


def test_policy_loss_config_carries_the_options_and_stays_verls():
    config = PolicyLossConfig(loss_mode="pgzoo/minirl", pgzoo={"eps_high": 0.3})
    assert config.get("pgzoo") == {"eps_high": 0.3}
    assert {f.name for f in dataclasses.fields(config)} >= {"loss_mode", "rollout_correction", "pgzoo"}
