"""pgzoo.adapters.trl: the adapter's gradient on real TRL batches equals the objective on the full mini-batch.

Each test drives TRL 1.16's GRPOTrainer end to end on the tiny MoE (CPU). A deterministic ``rollout_func`` samples
completions of varied lengths with logprobs μ = π_θ + noise, so token counts differ across micro-batches, the
train–inference discrepancy is non-zero and every objective (MiniRL's included) has what it needs. Before each
optimizer step a callback recomputes the gradient naively — one forward of a fresh copy of the model over every row
of the optimizer step, ``log_softmax`` of the logits, ``pgzoo.get(name)`` on one TokenBatch with its default
normalisers — and compares.
"""

from __future__ import annotations

import copy
import logging
import os

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
pytest.importorskip("trl")

import pgzoo  # noqa: E402
from pgzoo import advantages as pg_advantages  # noqa: E402
from pgzoo.errors import ConfigError, DependencyError, RoutingError  # noqa: E402
from pgzoo.models import build_tiny_dense  # noqa: E402

datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")
trl_adapter = pytest.importorskip("pgzoo.adapters.trl")
from pgzoo.adapters.trl.rollout import align_routes  # noqa: E402
from pgzoo.adapters.trl.checks import check_trl_version  # noqa: E402
from pgzoo.adapters.trl.checks import degenerate_rollout_logprobs  # noqa: E402
from trl import GRPOConfig  # noqa: E402

TEMPERATURE = 0.9
MAX_LEN = 8
from _trl_fixtures import PROMPTS, base_moe, tok  # noqa: E402,F401  (fixtures)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def moe_path(base_moe, tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("trl") / "tiny-moe"
    base_moe.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def naive_logprobs(model, input_ids, attention_mask, completion_len, temperature=TEMPERATURE):
    """log softmax(logits / temperature) of each completion token: the textbook computation, no fused head."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    logits = logits[:, -completion_len - 1 : -1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, input_ids[:, -completion_len:, None])[..., 0]


def reward_len(completions, **kwargs):
    return [float(len(c) % 4) for c in completions]


class FakeRollout:
    """A ``rollout_func``: random completions of 1..MAX_LEN tokens (half end in EOS), μ = π_θ(at sampling) + noise."""

    def __init__(self, noise=0.1):
        self.calls = 0
        self.noise = noise

    def __call__(self, prompts, trainer):
        gen = torch.Generator().manual_seed(1000 + self.calls)
        self.calls += 1
        prompt_ids, _, _ = trainer._tokenize_prompts(prompts)
        vocab = trainer.model.config.vocab_size
        model = trainer.accelerator.unwrap_model(trainer.model)
        comps, lps = [], []
        for ids in prompt_ids:
            n = int(torch.randint(1, MAX_LEN + 1, (1,), generator=gen))
            comp = torch.randint(4, vocab, (n,), generator=gen).tolist()
            if n < MAX_LEN and torch.rand((), generator=gen) < 0.5:
                comp[-1] = trainer.eos_token_ids[0]
            full = torch.tensor([ids + comp])
            with torch.no_grad():
                lp = naive_logprobs(model, full, torch.ones_like(full), n, trainer.temperature)[0]
            lp = (lp + self.noise * torch.randn(n, generator=gen)).clamp(max=0.0)
            comps.append(comp)
            lps.append(lp.tolist())
        return {"prompt_ids": prompt_ids, "completion_ids": comps, "logprobs": lps}


def make_config(tmp_path, **overrides):
    params = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=MAX_LEN,
        gradient_accumulation_steps=2,
        steps_per_generation=4,
        max_steps=2,
        learning_rate=0.05,
        optim="sgd",
        max_grad_norm=0.0,  # no clipping: compare raw gradients
        lr_scheduler_type="constant",
        temperature=TEMPERATURE,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        bf16=False,
        seed=0,
    )
    params.update(overrides)
    return GRPOConfig(**params)


def dataset():
    return datasets.Dataset.from_dict({"prompt": PROMPTS})


class Spy(trl_adapter.GRPOTrainer):
    """Records every micro-batch the loss sees, and the gradient before each optimizer step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.window: list[dict] = []
        self.steps: list[dict] = []
        self.add_callback(_GradProbe(self))

    def _compute_loss(self, model, inputs):
        self.window.append({k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()})
        return super()._compute_loss(model, inputs)


class _GradProbe(transformers.TrainerCallback):
    def __init__(self, trainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        tr = self.trainer
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        params = {n: p.detach().clone() for n, p in model.state_dict().items()}
        tr.steps.append({"window": tr.window, "grads": grads, "params": params})
        tr.window = []


def cat_window(window, key):
    values = [mb.get(key) for mb in window]
    return None if values[0] is None else torch.cat(values)


def reference_gradient(base, step, objective, max_tokens, routes_mode=None):
    """Gradient of ``objective`` on all rows of the optimizer step, computed naively on a fresh model copy."""
    model = copy.deepcopy(base)
    model.load_state_dict(step["params"])
    model.train()
    w = step["window"]
    ids = torch.cat([cat_window(w, "prompt_ids"), cat_window(w, "completion_ids")], 1)
    am = torch.cat([cat_window(w, "prompt_mask"), cat_window(w, "completion_mask")], 1)
    T = w[0]["completion_ids"].shape[1]
    if routes_mode is not None:
        with pgzoo.routing.replay(model, cat_window(w, "pgzoo_routes").long()) as rp:
            lp = naive_logprobs(model, ids, am, T)
        assert rp.layers_hit == 4
    else:
        lp = naive_logprobs(model, ids, am, T)
    batch = pgzoo.TokenBatch(
        logprobs=lp,
        mask=cat_window(w, "completion_mask").bool(),
        advantages=cat_window(w, "advantages"),
        old_logprobs=cat_window(w, "old_per_token_logps"),
        rollout_logprobs=cat_window(w, "sampling_per_token_logps"),
        ref_logprobs=cat_window(w, "ref_per_token_logps"),
        max_tokens=max_tokens,
    )
    objective(batch).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, lp.detach()


def relative_error(a: dict, b: dict) -> float:
    num = sum(float((a[n] - b[n]).pow(2).sum()) for n in b)
    den = sum(float(b[n].pow(2).sum()) for n in b)
    assert den > 0, "reference gradient is zero: the test would prove nothing"
    return (num / den) ** 0.5


def run_spy(tmp_path, base, tok, loss, **kwargs):
    config_overrides = kwargs.pop("config", {})
    trainer = Spy(
        model=kwargs.pop("model", None) or copy.deepcopy(base),
        reward_funcs=reward_len,
        args=make_config(tmp_path, **config_overrides),
        train_dataset=dataset(),
        processing_class=tok,
        rollout_func=kwargs.pop("rollout_func", FakeRollout()),
        loss=loss,
        **kwargs,
    )
    trainer.train()
    return trainer


# ---------------------------------------------------------------------------------------------- gradients
# objectives that select tokens by batch statistics (clip-cov, kl-cov) select per micro-batch, as in verl. Each case
# builds a TRL trainer (about a second): one objective per kind of term runs in the quick `-m "not slow"` loop, every
# registered one in the full suite.
QUICK_TRL = {"minirl", "grpo", "dapo", "dr-grpo", "cispo", "gspo", "gspo-token"}


@pytest.mark.parametrize("name", [n if n in QUICK_TRL else pytest.param(n, marks=pytest.mark.slow)
                                  for n in pgzoo.available() if pgzoo.get(n).shard_additive
                                  and "ref_logprobs" not in pgzoo.get(n).requires])  # A*-PO: refused below
def test_gradient_equals_objective_on_full_minibatch(name, tmp_path, base_moe, tok):
    """GA = 2, steps_per_generation = 4: two optimizer steps per rollout, the second one off-policy."""
    objective = pgzoo.get(name)
    trainer = run_spy(tmp_path, base_moe, tok, objective)
    assert len(trainer.steps) == 2
    lps = []
    for k, step in enumerate(trainer.steps):
        assert len(step["window"]) == 2
        ref, lp = reference_gradient(base_moe, step, objective, MAX_LEN)
        err = relative_error(step["grads"], ref)
        assert err < 1e-4, f"{name} step {k}: relative gradient error {err:.2e}"
        lps.append(lp)
    counts = [int(mb["completion_mask"].sum()) for mb in trainer.steps[0]["window"]]
    assert counts[0] != counts[1]  # micro-batches differ in token counts (fixed seeds), so normalisers matter
    # TRL's old logprobs (fused head, temperature, θ_old) equal the textbook ones of the reference at step 0 ...
    m0 = cat_window(trainer.steps[0]["window"], "completion_mask").bool()
    old0 = cat_window(trainer.steps[0]["window"], "old_per_token_logps")
    assert torch.allclose(old0[m0], lps[0][m0], atol=1e-5)
    # ... and the second step is off-policy: θ moved since θ_old, so the ratio r differs from 1 there
    m1 = cat_window(trainer.steps[1]["window"], "completion_mask").bool()
    old1 = cat_window(trainer.steps[1]["window"], "old_per_token_logps")
    assert float((lps[1] - old1)[m1].abs().max()) > 1e-4


def test_per_micro_batch_normalisers_would_differ(tmp_path, base_moe, tok):
    """The comparison above can fail: TRL-style local normalisation (each micro-batch its own counts) is off."""
    objective = pgzoo.get("dapo")
    trainer = run_spy(tmp_path, base_moe, tok, objective, config={"max_steps": 1})
    step = trainer.steps[0]
    ref, _ = reference_gradient(base_moe, step, objective, MAX_LEN)
    local = {n: torch.zeros_like(g) for n, g in ref.items()}
    for mb in step["window"]:
        g, _ = reference_gradient(base_moe, {"window": [mb], "params": step["params"]}, objective, MAX_LEN)
        for n in local:
            local[n] += g[n] / 2  # what averaging per-micro-batch token means over GA = 2 would give
    assert relative_error(local, ref) > 1e-2
    assert relative_error(step["grads"], ref) < 1e-4


def test_gradient_with_gradient_accumulation_only(tmp_path, base_moe, tok):
    """steps_per_generation = GA = 4: one on-policy optimizer step over four micro-batches (TRL skips old logps)."""
    objective = pgzoo.get("minirl")
    trainer = run_spy(tmp_path, base_moe, tok, objective,
                      config={"gradient_accumulation_steps": 4, "steps_per_generation": 4, "max_steps": 1})
    step = trainer.steps[0]
    assert len(step["window"]) == 4 and step["window"][0].get("old_per_token_logps") is None
    ref, _ = reference_gradient(base_moe, step, objective, MAX_LEN)
    assert relative_error(step["grads"], ref) < 1e-4


def test_gradient_with_num_iterations(tmp_path, base_moe, tok):
    """steps_per_generation = 2, num_iterations = 2, GA = 2: the same rollout feeds two optimizer steps."""
    objective = pgzoo.get("cispo")
    trainer = run_spy(tmp_path, base_moe, tok, objective,
                      config={"steps_per_generation": 2, "num_iterations": 2, "max_steps": 2})
    for step in trainer.steps:
        ref, _ = reference_gradient(base_moe, step, objective, MAX_LEN)
        assert relative_error(step["grads"], ref) < 1e-4


@pytest.mark.parametrize("name", ["grpo", "minirl"])
def test_gradient_with_masked_truncated_completions(name, tmp_path, base_moe, tok):
    """mask_truncated_completions: rows without EOS have no counted token and do not count in N_seq."""
    objective = pgzoo.get(name)
    trainer = run_spy(tmp_path, base_moe, tok, objective, config={"mask_truncated_completions": True, "max_steps": 1})
    step = trainer.steps[0]
    empty = int((cat_window(step["window"], "completion_mask").sum(-1) == 0).sum())
    assert 0 < empty < 8  # some rows masked out entirely, some kept
    ref, _ = reference_gradient(base_moe, step, objective, MAX_LEN)
    assert relative_error(step["grads"], ref) < 1e-4


def test_gradient_with_kl_to_reference(tmp_path, base_moe, tok, moe_path):
    """β > 0: TRL loads a reference model (GRPOConfig.beta) and the objective's own KL term uses its logprobs."""
    objective = pgzoo.get("grpo", beta=0.04)
    trainer = run_spy(tmp_path, base_moe, tok, objective, model=moe_path, config={"beta": 0.04, "max_steps": 2})
    for step in trainer.steps:
        assert step["window"][0]["ref_per_token_logps"] is not None
        ref, _ = reference_gradient(base_moe, step, objective, MAX_LEN)
        assert relative_error(step["grads"], ref) < 1e-4


def test_gradient_under_r2_replay(tmp_path, base_moe, tok):
    """R2: the loss replays θ_old's routes; the reference replays the same routes in a plain forward."""
    objective = pgzoo.get("minirl")
    trainer = run_spy(tmp_path, base_moe, tok, objective, routing_replay="R2")
    assert trainer.last_layers_hit == 4
    for step in trainer.steps:
        ref, _ = reference_gradient(base_moe, step, objective, MAX_LEN, routes_mode="R2")
        assert relative_error(step["grads"], ref) < 1e-4
    logged = [h for h in trainer.state.log_history if "pgzoo/routing/layers_hit" in h]
    assert logged and all(h["pgzoo/routing/layers_hit"] == 4 for h in logged)


def test_gradient_under_r2_with_gradient_checkpointing(tmp_path, base_moe, tok):
    """Checkpointed layers recompute their forward in backward: the adapter keeps replaying until backward ran."""
    objective = pgzoo.get("grpo")
    trainer = run_spy(tmp_path, base_moe, tok, objective, routing_replay="R2",
                      config={"gradient_checkpointing": True, "max_steps": 1})
    ref, _ = reference_gradient(base_moe, trainer.steps[0], objective, MAX_LEN, routes_mode="R2")
    assert relative_error(trainer.steps[0]["grads"], ref) < 1e-4


def test_gradient_under_r3_replay(tmp_path, base_moe, tok):
    """R3 with a float32 TransformersEngine: the rollout's routes reach TRL's layout, the old-logprob pass and the loss.

    Same weights and the engine's routes replayed, so TRL's θ_old logprobs must equal the engine's μ: a route
    shifted by one position would force the wrong experts and break this.
    """
    from pgzoo.rollout import TransformersEngine

    objective = pgzoo.get("minirl")
    rollout = trl_adapter.EngineRollout(TransformersEngine(base_moe))
    trainer = run_spy(tmp_path, base_moe, tok, objective, routing_replay="R3", rollout_func=rollout)
    assert trainer.last_layers_hit == 4
    w0 = trainer.steps[0]["window"]
    m = cat_window(w0, "completion_mask").bool()
    old, mu = cat_window(w0, "old_per_token_logps"), cat_window(w0, "sampling_per_token_logps")
    assert torch.allclose(old[m], mu[m], atol=1e-4)
    for step in trainer.steps:
        ref, _ = reference_gradient(base_moe, step, objective, MAX_LEN, routes_mode="R3")
        assert relative_error(step["grads"], ref) < 1e-4
    # Every real token of TRL's layout carries the engine's route for that token (compared through the masks).
    ro = rollout.last_rollouts  # the second rollout fed step 2 (steps_per_generation = 4: one rollout here)
    eng_real = torch.cat([ro.prompt_mask, ro.completion_mask], 1).bool()
    rows = {tuple(r.tolist()): i for i, r in enumerate(torch.cat([ro.prompt_ids, ro.completion_ids], 1))}
    for mb in [mb for step in trainer.steps for mb in step["window"]]:
        real = torch.cat([mb["prompt_mask"], mb["completion_mask"]], 1).bool()
        for j in range(real.shape[0]):
            ids = torch.cat([mb["prompt_ids"][j][mb["prompt_mask"][j].bool()],
                             mb["completion_ids"][j][mb["completion_mask"][j].bool()]])
            i = [v for k, v in rows.items() if list(torch.tensor(k)[eng_real[v]]) == ids.tolist()][0]
            assert torch.equal(mb["pgzoo_routes"][j][real[j]].long(), ro.routes[i][eng_real[i]].long())
            assert (mb["pgzoo_routes"][j][~real[j]] == -1).all()


# ---------------------------------------------------------------------------------------------- advantages
@pytest.mark.parametrize("name", ["minirl", "grpo", "opo"])
def test_advantages_are_the_objectives_estimator(name, tmp_path, base_moe, tok):
    objective = pgzoo.get("grpo", default_advantage="opo") if name == "opo" else pgzoo.get(name)
    trainer = run_spy(tmp_path, base_moe, tok, objective, config={"max_steps": 2})
    rows = [mb for step in trainer.steps for mb in step["window"]]  # the 16 rows of the one rollout, shuffled
    groups, rewards, adv, lengths = [], [], [], []
    for mb in rows:
        for p, pm, c, cm, a in zip(mb["prompt_ids"], mb["prompt_mask"], mb["completion_ids"],
                                   mb["completion_mask"], mb["advantages"]):
            groups.append(tuple(p[pm.bool()].tolist()))
            lengths.append(max(1, int(cm.sum())))
            rewards.append(reward_len([tok.decode(c[cm.bool()].tolist(), skip_special_tokens=True)])[0])
            adv.append(float(a))
    labels = torch.tensor([sorted(set(groups)).index(g) for g in groups])
    expected = pg_advantages.compute(objective.default_advantage, torch.tensor(rewards), group_ids=labels,
                                     lengths=torch.tensor(lengths))
    assert len(set(groups)) == 4
    if name == "opo":  # the lengths differ, so the length-weighted baseline is not the group mean
        assert not torch.allclose(expected, pg_advantages.compute("group-mean", torch.tensor(rewards), group_ids=labels))
    assert torch.allclose(torch.tensor(adv), expected.float(), atol=1e-5)
    assert expected.abs().max() > 0.1
    # the completions table TRL logs shows the same advantages (TRL's own were replaced)
    logged = torch.tensor(list(trainer._logs["advantages"])[-16:])
    assert torch.allclose(logged.sort().values, expected.float().sort().values, atol=1e-5)


# ---------------------------------------------------------------------------------------------- errors
def trainer_kwargs(tmp_path, base, tok, **config):
    return dict(model=copy.deepcopy(base), reward_funcs=reward_len, args=make_config(tmp_path, **config),
                train_dataset=dataset(), processing_class=tok)


def test_minirl_on_trl_generation_uses_old_logprobs_unless_engine_is_asked(tmp_path, base_moe, tok, caplog):
    # the one line: TRL's transformers generation samples with the policy itself, so μ_θold = π_θold
    with caplog.at_level(logging.INFO, logger="pgzoo.adapters.trl"):
        trainer = trl_adapter.GRPOTrainer(loss=pgzoo.get("minirl"), **trainer_kwargs(tmp_path, base_moe, tok))
    assert trainer.rollout_logprobs == "old"
    assert sum("μ_θold = π_θold" in r.getMessage() for r in caplog.records) == 1
    # objectives that need no μ keep μ absent; an engine's μ is used when there is one
    assert trl_adapter.GRPOTrainer(loss="minirl-no-is", **trainer_kwargs(tmp_path, base_moe, tok)
                                   ).rollout_logprobs == "engine"
    assert trl_adapter.GRPOTrainer(loss="minirl", rollout_func=FakeRollout(),
                                   **trainer_kwargs(tmp_path, base_moe, tok)).rollout_logprobs == "engine"
    # explicit settings: 'engine' without an engine, 'old' with one, both raise naming the fix
    with pytest.raises(ConfigError, match="rollout_func=pgzoo.adapters.trl.EngineRollout") as info:
        trl_adapter.GRPOTrainer(loss="minirl", rollout_logprobs="engine", **trainer_kwargs(tmp_path, base_moe, tok))
    assert "use_vllm=True" in str(info.value)
    with pytest.raises(ConfigError, match="drop rollout_logprobs='old'"):
        trl_adapter.GRPOTrainer(loss="minirl", rollout_logprobs="old", rollout_func=FakeRollout(),
                                **trainer_kwargs(tmp_path, base_moe, tok))


def test_an_estimator_the_adapter_cannot_feed_is_refused(tmp_path, base_moe, tok):
    """The adapter hands an estimator rewards, groups and lengths: one that needs more is refused by name at once."""
    for name, needs in [("optimal-token-baseline", "old_logprobs, sum_pi_squared"), ("remax", "baseline_rewards")]:
        with pytest.raises(ConfigError, match=f"advantage={name!r} needs inputs the adapter does not produce "
                                              f"\\({needs}\\)"):
            trl_adapter.GRPOTrainer(loss="minirl", advantage=name, **trainer_kwargs(tmp_path, base_moe, tok))


def test_peft_lora_with_r2(tmp_path, base_moe, tok):
    """LoRA through TRL's peft_config: routing replay finds the MoE layers under the PEFT wrapper."""
    peft = pytest.importorskip("peft")
    trainer = run_spy(tmp_path, base_moe, tok, pgzoo.get("minirl"), routing_replay="R2", config={"max_steps": 1},
                      peft_config=peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert trainer.last_layers_hit == 4
    grads = trainer.steps[0]["grads"]
    assert grads and all("lora_" in n for n in grads) and any(float(g.abs().max()) > 0 for g in grads.values())


def test_untested_trl_version_raises(monkeypatch):
    with pytest.raises(DependencyError, match=r"tested with TRL >=1.16,<1.17 but TRL 1.17.0"):
        check_trl_version("1.17.0")
    with pytest.raises(DependencyError, match="pip install 'pgzoo\\[trl\\]'"):
        check_trl_version("0.19.1")
    check_trl_version("1.16.0")
    check_trl_version("1.16.3.dev0")
    monkeypatch.setenv("PGZOO_ALLOW_UNTESTED_TRL", "1")
    check_trl_version("2.0.0")


@pytest.mark.parametrize(
    "kwargs, config, match",
    [
        ({"loss": 3}, {}, "takes a pgzoo objective"),
        ({"loss": "grpo", "routing_replay": "R4"}, {}, "routing_replay mode"),
        ({"loss": "grpo", "advantage": "z-score"}, {}, "not an estimator"),
        ({"loss": "grpo"}, {"steps_per_generation": 3, "gradient_accumulation_steps": 2,
                            "per_device_train_batch_size": 4, "generation_batch_size": None},
         "not a multiple of gradient_accumulation_steps"),
        ({"loss": pgzoo.get("grpo", beta=0.1)}, {"beta": 0.04}, "GRPOConfig.beta=0.04 but objective 'grpo' has beta=0.1"),
        ({"loss": pgzoo.get("grpo", beta=0.04)}, {}, r"Set GRPOConfig\(beta=0.04\)"),
        ({"loss": "a-star-po"}, {}, "reads the reference policy's logprobs in its own term"),
        ({"loss": "gspo"}, {"importance_sampling_level": "sequence"}, "importance_sampling_level"),
        ({"loss": "gspo"}, {"top_entropy_quantile": 0.2}, "top_entropy_quantile=0.2 drops tokens.*one per sequence"),
        ({"loss": "grpo"}, {"loss_type": "sapo"}, "loss_type='sapo' but loss='grpo'"),
        ({"loss": "grpo"}, {"use_adaptive_entropy": True}, "use_adaptive_entropy"),
        ({}, {"loss_type": "cispo"}, "epsilon_high"),
        ({"loss": "grpo", "routing_replay": "R3"}, {}, "routing_replay='R3' replays the rollout engine's routes"),
    ],
)
def test_settings_the_adapter_cannot_honour_raise(kwargs, config, match, tmp_path, base_moe, tok):
    with pytest.raises(ConfigError, match=match):
        trl_adapter.GRPOTrainer(**kwargs, **trainer_kwargs(tmp_path, base_moe, tok, **config))


def test_routing_replay_needs_a_moe_model(tmp_path, tok):
    dense = build_tiny_dense(vocab_size=len(tok))
    with pytest.raises(RoutingError, match="Qwen3"):
        trl_adapter.GRPOTrainer(loss="grpo", routing_replay="R2", **trainer_kwargs(tmp_path, dense, tok))


def test_trl_vllm_importance_correction_is_never_applied_twice(tmp_path, base_moe, tok, monkeypatch):
    """With TRL's own vLLM, TRL's IS ratio is not multiplied in; an objective without its own correction raises."""
    from trl import GRPOTrainer as TRLTrainer

    def fake_init(self, *args, **kwargs):  # TRL's vLLM init needs a GPU; keep the rest of TRL's __init__ real
        real_init(self, *args, **kwargs)
        self.use_vllm = True

    real_init = TRLTrainer.__init__
    monkeypatch.setattr(TRLTrainer, "__init__", fake_init)
    with pytest.raises(ConfigError, match="vllm_importance_sampling_correction=False"):
        trl_adapter.GRPOTrainer(loss="grpo", **trainer_kwargs(tmp_path, base_moe, tok))
    trl_adapter.GRPOTrainer(loss=pgzoo.get("grpo", correction={"level": "token", "mode": "truncate", "cap": 2.0}),
                            **trainer_kwargs(tmp_path, base_moe, tok))
    trl_adapter.GRPOTrainer(loss="minirl", **trainer_kwargs(tmp_path, base_moe, tok))


# ---------------------------------------------------------------------------------------------- rollout glue
def test_align_routes_repads_to_trls_layout():
    from pgzoo.rollout import Rollouts

    L, k = 2, 2
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1]], dtype=torch.bool)  # engine: P = 3, left-padded
    completion_mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)  # T = 3, right-padded
    routes = torch.arange(2 * 6 * L * k).reshape(2, 6, L, k) % 7
    routes[:, :, :, 1] = routes[:, :, :, 0] + 1  # distinct ids within each top-2
    ro = Rollouts(prompt_ids=torch.ones(2, 3, dtype=torch.long), prompt_mask=prompt_mask,
                  completion_ids=torch.ones(2, 3, dtype=torch.long), completion_mask=completion_mask,
                  logprobs=torch.zeros(2, 3), truncated=torch.zeros(2, dtype=torch.bool),
                  group=torch.zeros(2, dtype=torch.long), routes=routes)
    out = align_routes(ro, 4, 5)  # TRL padded to multiples: P' = 4, T' = 5
    assert out.shape == (2, 9, L, k)
    real_out = torch.zeros(2, 9, dtype=torch.bool)
    real_out[0, 2:4] = real_out[0, 4:7] = True
    real_out[1, 1:4] = real_out[1, 4:5] = True
    real_in = torch.cat([prompt_mask, completion_mask], 1)
    for i in range(2):
        assert torch.equal(out[i][real_out[i]], routes[i][real_in[i]])
        assert (out[i][~real_out[i]] == -1).all()
    with pytest.raises(pgzoo.EngineError, match="trainer's batch holds 1 \\+ 5"):
        align_routes(ro, 1, 5)


class RecordingEngine:
    """Stands in for a pgzoo engine: records generate/load_weights calls, returns one-token completions."""

    supports_routes = False

    def __init__(self):
        self.generate_calls, self.loads = [], 0

    def load_weights(self, model):
        self.loads += 1

    def generate(self, prompts, n=1, max_new_tokens=8, temperature=1.0, top_p=1.0, seed=None, return_routes=False):
        from pgzoo.rollout import Rollouts

        self.generate_calls.append(dict(prompts=prompts, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                                        seed=seed))
        rows = [p for p in prompts for _ in range(n)]
        P = max(map(len, rows))
        ids = torch.tensor([[0] * (P - len(p)) + p for p in rows])
        return Rollouts(prompt_ids=ids, prompt_mask=ids != 0, completion_ids=torch.full((len(rows), 1), 5),
                        completion_mask=torch.ones(len(rows), 1, dtype=torch.bool),
                        logprobs=torch.full((len(rows), 1), -0.5), truncated=torch.ones(len(rows), dtype=torch.bool),
                        group=torch.arange(len(rows)) // n)


def test_engine_rollout_samples_once_per_group_and_syncs_per_step(tmp_path, base_moe, tok):
    engine = RecordingEngine()
    rollout = trl_adapter.EngineRollout(engine, seed=11)
    trainer = trl_adapter.GRPOTrainer(loss="grpo", rollout_func=rollout, **trainer_kwargs(tmp_path, base_moe, tok))
    grouped = ["1+2="] * 4 + ["3+4="] * 4
    out = rollout(grouped, trainer)
    call = engine.generate_calls[-1]
    assert call["n"] == 4 and len(call["prompts"]) == 2 and call["max_new_tokens"] == MAX_LEN
    # one seed per prompt, hashed from (seed, process, prompt): far apart, so seed + j never meets another prompt's
    from pgzoo.rollout.base import mix_seed

    assert call["temperature"] == TEMPERATURE and call["seed"] == [mix_seed(11, 0, 0), mix_seed(11, 0, 1)]
    assert abs(call["seed"][0] - call["seed"][1]) > 4
    assert out["prompt_ids"][0] == tok("1+2=")["input_ids"] and out["completion_ids"][0] == [5]
    assert out["logprobs"][0] == [-0.5] and len(out["prompt_ids"]) == 8
    rollout(["1+2=", "3+4=", "5+6=", "1+2="], trainer)  # not in blocks of num_generations: one sample per prompt
    assert engine.generate_calls[-1]["n"] == 1 and len(engine.generate_calls[-1]["prompts"]) == 4
    assert engine.loads == 1  # global_step did not move: one sync
    trainer.state.global_step += 1
    rollout(grouped, trainer)
    assert engine.loads == 2 and engine.generate_calls[-1]["seed"] != call["seed"]


def test_engine_rollout_rejects_sampling_settings_it_cannot_honour(tmp_path, base_moe, tok):
    with pytest.raises(ConfigError, match="GRPOConfig.top_k=5"):
        trl_adapter.GRPOTrainer(loss="grpo", rollout_func=trl_adapter.EngineRollout(RecordingEngine()),
                                **trainer_kwargs(tmp_path, base_moe, tok, top_k=5))
    with pytest.raises(ConfigError, match="needs a pgzoo rollout engine"):
        trl_adapter.EngineRollout(object())


def test_import_without_trl_names_the_extra():
    import subprocess
    import sys

    code = ("import sys; sys.modules['trl'] = None\n"
            "try:\n    import pgzoo.adapters.trl\nexcept Exception as e:\n    print(type(e).__name__, e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert out.startswith("DependencyError") and "pip install 'pgzoo[trl]'" in out


# ---------------------------------------------------------------------------------------------- degenerate μ
def test_degenerate_rollout_logprobs_are_named():
    lp = torch.tensor([[-1.0, -2.0, -0.5]])
    mask = torch.tensor([[1, 1, 0]])
    assert degenerate_rollout_logprobs(lp + 0.01, lp, mask) is None
    assert "every log μ is 0" in degenerate_rollout_logprobs(torch.zeros_like(lp), lp, mask)
    assert "1.75 nats (above 1)" in degenerate_rollout_logprobs(lp - 1.75, lp, mask)
    assert degenerate_rollout_logprobs(lp, lp, torch.zeros_like(mask)) is None


class ZeroLogprobRollout(FakeRollout):
    """An engine that returns no real logprobs: every log μ is 0."""

    def __call__(self, prompts, trainer):
        out = super().__call__(prompts, trainer)
        out["logprobs"] = [[0.0] * len(lp) for lp in out["logprobs"]]
        return out


def test_trainer_warns_once_on_degenerate_rollout_logprobs(tmp_path, base_moe, tok):
    with pytest.warns(RuntimeWarning, match="first training batch look wrong: every log μ is 0") as record:
        run_spy(tmp_path, base_moe, tok, "minirl", rollout_func=ZeroLogprobRollout(), config={"max_steps": 1})
    assert sum("look wrong" in str(w.message) for w in record) == 1
