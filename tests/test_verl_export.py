"""``pgzoo recipe export --to verl``: the overrides for a recipe's objective, advantage, rollout and routing replay
(no verl needed)."""

from __future__ import annotations

import pgzoo
from pgzoo.adapters.verl.names import CONFIG_TARGET, recipe_overrides
from pgzoo.cli.main import main
from pgzoo.recipes import load_recipe


def test_paper_minirl_r3(capsys):
    assert main(["recipe", "export", "--to", "verl", "paper/minirl-r3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for expected in ["actor_rollout_ref.actor.policy_loss.loss_mode=pgzoo/minirl",
                     "actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-sum",
                     "algorithm.rollout_correction.rollout_is=token",
                     "algorithm.adv_estimator=grpo", "algorithm.norm_adv_by_std_in_grpo=false",
                     "actor_rollout_ref.rollout.n=16", "data.train_batch_size=64",
                     "actor_rollout_ref.actor.megatron.router_replay.mode=R3",
                     "actor_rollout_ref.rollout.enable_rollout_routing_replay=true"]:
        assert expected in lines
    assert any(line.startswith("# not exported:") for line in lines)
    # the paper's options are minirl's defaults: no pgzoo dict needed
    assert not any("policy_loss.pgzoo" in line for line in lines)


def test_changed_options_go_to_the_pgzoo_dict():
    recipe = load_recipe("paper/minirl", ["objective.options.eps_high=0.3", "objective.name=minirl-no-is"])
    lines, _ = recipe_overrides(recipe)
    assert f"actor_rollout_ref.actor.policy_loss._target_={CONFIG_TARGET}" in lines
    assert "+actor_rollout_ref.actor.policy_loss.pgzoo.eps_high=0.3" in lines
    assert not any("rollout_correction" in line for line in lines)  # minirl-no-is needs no rollout log-probs
    assert pgzoo.get("minirl-no-is", eps_high=0.3).config.eps_high == 0.3


def test_estimator_options_go_to_verls_setting_or_the_pgzoo_dict():
    """reinforce++'s gamma is verl's algorithm.gamma (replacing the 1.0 of the default mapping); an estimator the
    plugin registers takes its options from +algorithm.pgzoo; an option verl's own estimator has no setting for is
    named as not exported."""
    lines, _ = recipe_overrides(load_recipe("paper/minirl", ["objective.advantage=reinforce++",
                                                             "objective.advantage_options.gamma=0.99"]))
    assert "algorithm.adv_estimator=reinforce_plus_plus" in lines and "algorithm.gamma=0.99" in lines
    assert "algorithm.gamma=1.0" not in lines
    lines, _ = recipe_overrides(load_recipe("paper/minirl", ["objective.advantage=pass-at-k",
                                                             "objective.advantage_options.k=2"]))
    assert "algorithm.adv_estimator=pgzoo/pass-at-k" in lines and "+algorithm.pgzoo.k=2" in lines
    lines, rest = recipe_overrides(load_recipe("paper/minirl", ["objective.advantage=group-mean-std",
                                                                "objective.advantage_options.eps=0.001"]))
    assert "algorithm.adv_estimator=grpo" in lines
    assert any(r.startswith("objective.advantage_options.eps=0.001 (verl's grpo has no setting") for r in rest)
