"""A*-PO (``a-star-po``, ``a2po``) and its advantage estimator ``a-star``: against a naive float64 loop of the formula
in pgzoo/objectives/astar_po.py, and against TRL 1.16's own code on the same tensors.

- The loss and its gradient equal ``A2POTrainer.compute_loss`` run on a stub trainer whose ``_get_sequence_logps`` is
  TRL's own (bound to the stub, fed by a fake model that returns fixed logits): the sequence log-probs, the implicit
  reward and the squared error are all TRL's code; the gradient is compared w.r.t. the logits.
- V* equals TRL's stage 1, ``A2POTrainer._estimate_optimal_values``, run on a stub trainer (a fake tokenizer and
  reference model whose "completions" are indices into a table of rewards, TRL's ``_calculate_rewards`` and
  ``gather_object``): stage 1 is a method that samples and scores, not a separable function, so the reward table
  goes in and TRL's cached V* per prompt comes out.
"""

from __future__ import annotations

import contextlib
import math
import types
from collections import defaultdict

import pytest
import torch
from _objective_checks import assert_matches_reference, naive_gradient

import pgzoo

NAN = float("nan")


# ---------------------------------------------------------------------------------------------- the formula
def naive_loss(config, batch, lp):
    """Σ_i (β2·Σ_t m(lp − ref) − A_i)² / N_seq over the rows with a token, token by token; a [B, T] advantage enters
    as its mean over the row's tokens."""
    B, T = batch.mask.shape
    rows = [[t for t in range(T) if batch.mask[i, t]] for i in range(B)]
    n_seq = batch.num_sequences or sum(1 for r in rows if r)
    total = lp.new_zeros(())
    for i, tokens in enumerate(rows):
        if not tokens:
            continue
        delta = sum(lp[i, t] - float(batch.ref_logprobs[i, t]) for t in tokens)
        if batch.advantages.dim() == 1:
            adv = float(batch.advantages[i])
        else:
            adv = sum(float(batch.advantages[i, t]) for t in tokens) / len(tokens)
        total = total + (config.beta2 * delta - adv) ** 2
    return total / n_seq


@pytest.mark.parametrize("per_token", [False, True], ids=["adv[B]", "adv[B,T]"])
@pytest.mark.parametrize("options,normalisers", [({}, {}), ({"beta2": 0.7}, {"num_sequences": 9})],
                         ids=["defaults", "beta2-global-count"])
def test_matches_naive_loop(options, normalisers, per_token):
    """NaN at every masked position and a fully masked row (it counts neither in the sum nor in N_seq)."""
    obj = pgzoo.get("a-star-po", **options)
    assert_matches_reference(obj, lambda o, b: naive_gradient(naive_loss, o, b),
                             dict(pad_value=NAN, fully_masked_row=True, per_token_advantages=per_token, scale=1.0,
                                  **normalisers), metrics_finite=True)


def test_metrics_and_alias():
    batch = pgzoo.testing.random_batch(5, 7, seed=3, fully_masked_row=True, pad_value=NAN, scale=1.0)
    out = pgzoo.get("a2po", beta2=0.5)(batch)
    rows = batch.mask.any(-1)
    delta = torch.where(batch.mask, batch.logprobs.detach() - batch.ref_logprobs, 0.0).sum(-1)[rows]
    implicit, adv = 0.5 * delta, batch.advantages[rows]
    torch.testing.assert_close(out.metrics["astar_po/implicit_reward_mean"], implicit.mean())
    torch.testing.assert_close(out.metrics["astar_po/advantage_mean"], adv.mean())
    torch.testing.assert_close(out.metrics["astar_po/sq_error_mean"], (implicit - adv).square().mean())
    torch.testing.assert_close(out.loss.detach(), (implicit - adv).square().mean())  # own counts: loss = mean error
    assert type(pgzoo.get("a2po")) is type(pgzoo.get("a-star-po")) and pgzoo.get("a2po").config.beta2 == 1e-3
    assert pgzoo.get("a-star-po").default_advantage == "a-star"
    assert pgzoo.get("a-star-po").requires == {"ref_logprobs"}


@pytest.mark.parametrize("options,match", [
    ({"beta": 0.1}, "beta=0.1 adds a KL penalty"),
    ({"off_policy_mask_threshold": 0.5}, "needs both signs"),
    ({"top_entropy_quantile": 0.2}, "no token term to drop"),
    ({"correction": {"level": "sequence"}}, "does not depend on the sampling policy"),
    ({"beta2": 0.0}, "beta2"), ({"beta2": -1.0}, "beta2"), ({"beta2": NAN}, "beta2"), ({"beta2": math.inf}, "beta2"),
    ({"beta2": "0.1"}, "beta2"),
])
def test_refuses_options_that_make_no_sense(options, match):
    with pytest.raises(pgzoo.ConfigError, match=match):
        pgzoo.get("a-star-po", **options)


def test_entropy_bonus_composes():
    batch = pgzoo.testing.random_batch(4, 6, seed=1)
    ent = torch.rand(4, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64).requires_grad_()
    batch = batch.replace(entropies=ent)
    plain = pgzoo.get("a-star-po")(batch).loss
    bonus = pgzoo.get("a-star-po", entropy_coef=0.1)(batch).loss
    torch.testing.assert_close(bonus, plain - 0.1 * ent[batch.mask].mean())


# ---------------------------------------------------------------------------------------------- TRL's stage 2
def test_loss_and_gradient_equal_trls_compute_loss():
    A2POTrainer = pytest.importorskip("trl.experimental.a2po.a2po_trainer").A2POTrainer
    from trl.trainer.utils import selective_log_softmax

    g = torch.Generator().manual_seed(0)
    B, P, C, V, beta2 = 4, 3, 5, 11, 0.05
    ids = torch.randint(0, V, (B, P + C), generator=g)
    lengths = torch.tensor([5, 1, 3, 4])  # TRL's completion mask: 1 up to and including the first EOS
    completion_mask = (torch.arange(C)[None] < lengths[:, None]).long()
    attention = torch.cat([torch.ones(B, P, dtype=torch.long), completion_mask], 1)
    logits = (2 * torch.randn(B, P + C, V, generator=g, dtype=torch.float64)).requires_grad_()
    ref_tokens = -3 * torch.rand(B, C, generator=g, dtype=torch.float64)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    v_star = torch.tensor([0.4, 0.4, 0.9, 0.1], dtype=torch.float64)

    class FixedLogits(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return types.SimpleNamespace(logits=logits)

    stub = types.SimpleNamespace(args=types.SimpleNamespace(beta2=beta2), model=types.SimpleNamespace(training=True),
                                 _metrics={"train": defaultdict(list)}, model_kwarg_keys=set())
    stub._get_sequence_logps = types.MethodType(A2POTrainer._get_sequence_logps, stub)
    inputs = {"input_ids": ids, "attention_mask": attention, "logits_to_keep": C,
              "ref_logps": (ref_tokens * completion_mask).sum(-1), "rewards": rewards, "v_star": v_star}
    trl_loss = A2POTrainer.compute_loss(stub, FixedLogits(), inputs)
    (trl_grad,) = torch.autograd.grad(trl_loss, logits)

    # pgzoo: per-token log-probs of the same logits (garbage-free: the mask is what hides the padding), NaN in the
    # reference at padded positions
    lp = selective_log_softmax(logits[:, P - 1:-1], ids[:, P:])
    mask = completion_mask.bool()
    batch = pgzoo.TokenBatch(logprobs=lp, mask=mask, advantages=rewards - v_star,
                             ref_logprobs=torch.where(mask, ref_tokens, NAN))
    out = pgzoo.get("a-star-po", beta2=beta2)(batch)
    (grad,) = torch.autograd.grad(out.loss, logits)
    torch.testing.assert_close(out.loss, trl_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, trl_grad, rtol=1e-10, atol=1e-14)
    assert grad.abs().sum() > 0
    metrics = stub._metrics["train"]
    assert out.metrics["astar_po/implicit_reward_mean"].item() == pytest.approx(metrics["implicit_reward"][0], 1e-12)
    assert out.metrics["astar_po/advantage_mean"].item() == pytest.approx(metrics["advantage"][0], 1e-12)


# ---------------------------------------------------------------------------------------------- the estimator
def naive_v_star(rewards, beta1):
    return beta1 * math.log(sum(math.exp(r / beta1) for r in rewards) / len(rewards))


@pytest.mark.parametrize("beta1", [0.5, 0.05, 3.0])
def test_estimator_matches_naive_loop(beta1):
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.3, 0.3, 0.3, 0.3, 0.0, 0.0, 1.0, 0.7], dtype=torch.float64)
    groups = [0, 1, 0, 1, 2, 2, 2, 2, 0, 3, 3, 3]
    adv = pgzoo.advantages.compute("a-star", rewards, group_ids=torch.tensor(groups), beta1=beta1)
    for i, g in enumerate(groups):
        members = [float(rewards[j]) for j, h in enumerate(groups) if h == g]
        want = 0.0 if len(set(members)) == 1 else float(rewards[i]) - naive_v_star(members, beta1)
        assert float(adv[i]) == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert (adv[4:8] == 0).all()  # a constant group: exactly 0


def test_estimator_limits_and_reference_rewards():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.5], dtype=torch.float64)
    mean = pgzoo.advantages.compute("group-mean", rewards, group_size=4)
    torch.testing.assert_close(pgzoo.advantages.compute("a-star", rewards, group_size=4, beta1=1e4), mean,
                               rtol=0, atol=1e-4)  # β1 → ∞: the group mean
    torch.testing.assert_close(pgzoo.advantages.compute("a-star", rewards, group_size=4, beta1=1e-3),
                               rewards - 1.0, rtol=0, atol=1e-2)  # β1 → 0: the group's best
    reference = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)[[0, 0, 1, 1]]
    adv = pgzoo.advantages.compute("a-star", rewards, group_size=2, reference_rewards=reference)
    want = [float(r) - naive_v_star(reference[i].tolist(), 0.5) for i, r in enumerate(rewards)]
    torch.testing.assert_close(adv, torch.tensor(want, dtype=torch.float64))
    assert float(adv[2]) == 0.0 and float(adv[3]) == 0.5  # all-zero reference rewards: V* = 0
    for bad, match in [(reference[:3], "reference_rewards must be"), (reference[:, :0], "reference_rewards must be"),
                       (reference.clone().fill_(NAN), "NaN")]:
        with pytest.raises(pgzoo.ConfigError, match=match):
            pgzoo.advantages.compute("a-star", rewards, group_size=2, reference_rewards=bad)
    with pytest.raises(pgzoo.ConfigError, match="beta1"):
        pgzoo.advantages.compute("a-star", rewards, group_size=2, beta1=0.0)
    assert "a-star" in pgzoo.advantages.trainer_estimators()


def test_v_star_equals_trls_stage_one(monkeypatch):
    """TRL's ``_estimate_optimal_values`` on a stub trainer: 3 prompts × n = 4 reference samples whose rewards come
    from a table; pgzoo's V* from the same rewards, as reference rewards and as the group's own."""
    a2po = pytest.importorskip("trl.experimental.a2po.a2po_trainer")
    A2POTrainer = a2po.A2POTrainer
    from accelerate import PartialState

    n, beta1 = 4, 0.3
    table = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0.25, 1.0, 0.5, 0.0]])
    prompts = ["p0", "p1", "p2"]

    class Tokenizer:
        def __call__(self, texts, **kwargs):
            return types.SimpleNamespace(to=lambda device: {"input_ids": torch.tensor([[int(t[1:])] for t in texts]),
                                                            "attention_mask": torch.ones(len(texts), 1)})

        def batch_decode(self, ids, skip_special_tokens):
            return [str(int(x)) for x in ids[:, 0]]

    class ReferenceModel:  # prompt k's j-th sample "decodes" to the index of its reward in the table
        def generate(self, input_ids, attention_mask, generation_config):
            rows = [torch.tensor([[k, k * n + j]]) for k in input_ids[:, 0].tolist() for j in range(n)]
            return torch.cat(rows)

    def reward(prompts, completions, **kwargs):
        return [float(table.view(-1)[int(c)]) for c in completions]

    PartialState()  # what gather_object and accelerate's logger read (a single process here)
    monkeypatch.setattr(a2po, "unwrap_model_for_generation", lambda model, accelerator: contextlib.nullcontext(model))
    stub = types.SimpleNamespace(
        args=types.SimpleNamespace(beta1=beta1, num_value_samples=n, per_device_train_batch_size=2,
                                   max_prompt_length=None, filter_all_incorrect=False),
        train_dataset=[{"prompt": p} for p in prompts], eval_dataset=None, processing_class=Tokenizer(),
        accelerator=types.SimpleNamespace(prepare=lambda x: x, device=torch.device("cpu")),
        ref_model=ReferenceModel(), value_generation_config=None, reward_funcs=[reward],
        reward_weights=torch.ones(1))
    stub._calculate_rewards = types.MethodType(A2POTrainer._calculate_rewards, stub)
    A2POTrainer._estimate_optimal_values(stub)
    trl_v = torch.tensor([stub._optimal_values[p] for p in prompts], dtype=torch.float64)

    rewards = torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64)  # one on-policy sample per prompt, as TRL's stage 2
    adv = pgzoo.advantages.compute("a-star", rewards, group_size=1, beta1=beta1,
                                   reference_rewards=table.double())
    torch.testing.assert_close(adv, rewards - trl_v, rtol=0, atol=1e-6)  # TRL's rewards and V* are float32
    # the group's own samples: the reference samples themselves as the group gives TRL's V* too
    own = pgzoo.advantages.compute("a-star", table.double().view(-1), group_size=n, beta1=beta1)
    torch.testing.assert_close(table.double().view(-1) - own, trl_v.repeat_interleave(n), rtol=0, atol=1e-6)
