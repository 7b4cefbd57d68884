"""``pgzoo.adapters.trl.AsyncGRPOTrainer``: TRL 1.16's ``AsyncGRPOTrainer`` with a pgzoo objective as its loss.

End to end that trainer needs a vLLM server and NCCL; what runs here is its loss path on TRL's own packed inputs.
Samples (shared prompts, completions sharing prefixes, a multi-turn sample with an untrained gap) are packed by TRL's
``TreeRow`` and collated by TRL's ``DataCollatorForRollout``; the model is a table of next-token distributions per
(token, position) with TRL's fused-head outputs (``log_probs``/``entropy`` per packed position, float64), because
TRL's tree attention needs a CUDA flash-attention kernel. The reference for TRL's loss is TRL's own
``AsyncGRPOTrainer.compute_loss`` on the same inputs; the reference for any objective is ``objective(TokenBatch)`` on
the samples laid out independently (one row per sample, tokens at their own positions).
"""

from __future__ import annotations

import logging
import os
import queue
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
pytest.importorskip("trl")
import trl.experimental.async_grpo.async_grpo_trainer as trl_async  # noqa: E402
from trl.experimental.async_grpo import AsyncGRPOConfig  # noqa: E402
from trl.experimental.async_grpo.async_grpo_trainer import DataCollatorForRollout  # noqa: E402
from trl.experimental.async_grpo.packing import TreeRow  # noqa: E402

import pgzoo  # noqa: E402
from pgzoo.adapters.trl import AsyncGRPOTrainer  # noqa: E402
from pgzoo.adapters.trl.async_trainer import NORMALISERS_KEY, window_value  # noqa: E402
from pgzoo.adapters.trl.checks import check_async_objective  # noqa: E402
from pgzoo.adapters.trl.config import objective_for_async  # noqa: E402
from pgzoo.adapters.trl.metrics import reduce_kind  # noqa: E402
from pgzoo.adapters.trl.packed import PackedLayout, packed_counts  # noqa: E402
from pgzoo.errors import ConfigError  # noqa: E402

V, MAX_POS, MAX_LEN = 6, 16, 8


class TableModel(torch.nn.Module):
    """Next-token distribution per (token, position): TRL's fused-head outputs for its packed forward."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(torch.randn(V, MAX_POS, V, generator=g, dtype=torch.float64))

    def logp(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.table[tokens, positions], -1)

    def forward(self, input_ids, position_ids, shift_labels, fused_lm_head, **tree_kwargs):
        assert fused_lm_head and tree_kwargs["tree_cu_seqlens_q"].numel() >= 2
        logp = self.logp(input_ids[0], position_ids[0])  # [N, V]
        labelled = shift_labels[0] != -100
        lp = logp.gather(-1, shift_labels[0].clamp(min=0)[:, None])[:, 0] * labelled
        ent = -(logp.exp() * logp).sum(-1) * labelled
        return SimpleNamespace(log_probs=lp[None], entropy=ent[None], aux_loss=None)


def make_samples(seed: int = 0) -> list[dict]:
    """Three prompts × three completions; completions of a prompt often share their first tokens; a noisy μ."""
    g = torch.Generator().manual_seed(seed)
    model = TableModel(seed)
    samples = []
    for group in range(3):
        prompt = torch.randint(0, V, (3 + group,), generator=g)
        for k in range(3):
            n = int(torch.randint(2, MAX_LEN - 1, (1,), generator=g))
            shared = torch.tensor([group % V, (group + 1) % V])[: min(k, 2)]  # the 2nd/3rd completion share a prefix
            completion = torch.cat([shared, torch.randint(0, V, (n,), generator=g)])
            ids = torch.cat([prompt, completion])
            mask = torch.cat([torch.zeros(len(prompt)), torch.ones(len(completion))]).long()
            if group == 2 and k == 2:
                mask[len(prompt) + 2: len(prompt) + 4] = 0  # tool output between two turns: forwarded, not trained
            with torch.no_grad():
                true = model.logp(ids[:-1], torch.arange(len(ids) - 1)).gather(-1, ids[1:, None])[:, 0]
            mu = torch.cat([torch.zeros(1), (true + 0.4 * torch.randn(len(true), generator=g, dtype=torch.float64))])
            samples.append({"input_ids": ids, "completion_mask": mask, "old_log_probs": (mu * mask).float(),
                            "advantage": float(torch.randn(1, generator=g)), "group_id": group, "metrics": {}})
    return samples


def collate(samples: list[dict], world: int = 1) -> list[dict]:
    """TRL's packing of one micro-batch into ``world`` rows, sliced per rank as its dispatcher does."""
    rows = [TreeRow() for _ in range(world)]
    for i, s in enumerate(samples):
        rows[i % world].add(s)
    batch = DataCollatorForRollout(pad_token_id=0, num_processes=world)([rows])
    return [{k: v[r:r + 1] for k, v in batch.items()} for r in range(world)]


def reference_batch(model: TableModel, samples: list[dict]) -> pgzoo.TokenBatch:
    """The samples as one TokenBatch, each token at its own position (independent of the adapter's layout)."""
    width = max(len(s["input_ids"]) for s in samples) - 1
    lp, mask, mu = [], [], []
    for s in samples:
        ids, n = s["input_ids"], len(s["input_ids"]) - 1
        row = model.logp(ids[:-1], torch.arange(n)).gather(-1, ids[1:, None])[:, 0]
        lp.append(torch.nn.functional.pad(row, (0, width - n)))
        mask.append(torch.nn.functional.pad(s["completion_mask"][1:].bool(), (0, width - n)))
        mu.append(torch.nn.functional.pad(s["old_log_probs"][1:].double(), (0, width - n)))
    mu = torch.stack(mu)
    return pgzoo.TokenBatch(logprobs=torch.stack(lp), mask=torch.stack(mask),
                            advantages=torch.tensor([s["advantage"] for s in samples]).float(),
                            old_logprobs=mu, rollout_logprobs=mu, max_tokens=MAX_LEN)


class Accelerator:
    """One process, or one of ``num_processes`` whose all-reduce is given (``reduced``)."""

    device = torch.device("cpu")

    def __init__(self, num_processes: int = 1, reduced: torch.Tensor | None = None):
        self.num_processes, self.reduced = num_processes, reduced

    def reduce(self, x, reduction="sum"):
        return x if self.reduced is None or x.shape != self.reduced.shape else self.reduced

    def gather(self, x):
        return x


def stand_in(cls, objective=None, *, epsilon_high=None, ga=1, accelerator=None):
    """A trainer of class ``cls`` carrying what ``compute_loss`` and ``get_batch_samples`` read."""
    t = cls.__new__(cls)
    t.args = SimpleNamespace(max_completion_length=MAX_LEN)
    t.objective = objective
    t.epsilon_low, t.epsilon_high = 0.2, 0.2 if epsilon_high is None else epsilon_high
    t.aux_loss_enabled = False
    t.accelerator = accelerator or Accelerator()
    t.current_gradient_accumulation_steps = ga
    t.model_accepts_loss_kwargs, t.compute_loss_func = False, None
    t._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    t._step_forward_tokens = t._step_trained_tokens = t._step_seq_len_weighted = 0.0
    t._step_samples = t._step_forward_s = 0.0
    t._pgzoo_mu_checked = False
    return t


def loss_and_grad(trainer, model, batches, *, steps=True):
    model.zero_grad()
    if steps:
        batches, _ = trainer.get_batch_samples(iter(batches), len(batches), torch.device("cpu"))
    total = 0.0
    for inputs in batches:
        loss = trainer.compute_loss(model, inputs)
        loss.backward()
        total += loss.item()
    return total, model.table.grad.clone()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("loss,epsilon_high", [("bnpo", None), ("dapo", 0.28)])
def test_ppo_clip_token_mean_equals_trls_own_loss(loss, epsilon_high):
    """One micro-batch, one process: pgzoo's PPO-clip token mean through the adapter is TRL's loss, in float64."""
    samples = make_samples()
    inputs = collate(samples)
    model = TableModel()
    objective = objective_for_async(None, AsyncGRPOConfig(output_dir="/tmp/pgzoo-trl-async", epsilon_high=epsilon_high,
                                                          bf16=False, use_cpu=True, report_to=[]))
    assert objective.name == "bnpo" and objective.config.eps_high == (epsilon_high or 0.2)
    if loss == "dapo":
        objective = pgzoo.get("dapo")  # eps 0.2 / 0.28: the same loss as TRL's epsilon_high=0.28
    trl = stand_in(trl_async.AsyncGRPOTrainer, epsilon_high=epsilon_high)
    ours = stand_in(AsyncGRPOTrainer, objective)
    trl_loss, trl_grad = loss_and_grad(trl, model, inputs, steps=False)
    our_loss, our_grad = loss_and_grad(ours, model, inputs)
    assert trl.model_accepts_loss_kwargs is False  # the stand-in leaves transformers' own item count out
    assert abs(our_loss - trl_loss) <= 1e-12 * abs(trl_loss)
    assert rel(our_grad, trl_grad) < 1e-12
    # the noisy μ clips tokens on both sides, so the comparison covers the clip
    assert trl._metrics["train"]["clip_ratio/low_mean"][0] > 0 and trl._metrics["train"]["clip_ratio/high_mean"][0] > 0
    ours_m, trl_m = ours._metrics["train"], trl._metrics["train"]
    assert ours_m["pgzoo/clip/low_fraction"] == pytest.approx(trl_m["clip_ratio/low_mean"])
    assert ours_m["entropy"] == pytest.approx(trl_m["entropy"])
    # TRL's per-step accounting still runs (its _log_step_metrics reads it)
    assert ours._step_trained_tokens == trl._step_trained_tokens > 0


@pytest.mark.parametrize("name", ["minirl", "dapo", "dr-grpo", "gspo"])
def test_global_normalisers_across_accumulation_and_processes(name):
    """Two processes × two accumulation micro-batches of unequal size: the DDP mean of the summed micro-batch
    gradients equals ``objective(TokenBatch)`` on every sample at once."""
    samples = make_samples(seed=1)
    parts = [samples[:3], samples[3:]]  # micro-batches of 3 and 6 samples, 2 rows each
    per_rank = [[collate(p, world=2)[rank] for p in parts] for rank in range(2)]
    total = sum(packed_counts(b["segment_id"], b["token_index"]) for rank in per_rank for b in rank)
    objective = pgzoo.get(name)
    model = TableModel(1)
    grads, losses = [], []
    for rank in range(2):
        t = stand_in(AsyncGRPOTrainer, objective, ga=2, accelerator=Accelerator(2, reduced=total))
        loss, grad = loss_and_grad(t, model, per_rank[rank])
        losses.append(loss)
        grads.append(grad)
    model.zero_grad()
    ref = objective(reference_batch(model, samples))
    ref.loss.backward()
    assert total.tolist() == [len(samples), int(reference_batch(model, samples).mask.sum())]
    assert all(b[NORMALISERS_KEY] == (total[0] / 2, total[1] / 2) for rank in per_rank for b in rank)
    assert sum(losses) / 2 == pytest.approx(ref.loss.item(), rel=1e-10)
    assert rel((grads[0] + grads[1]) / 2, model.table.grad) < 1e-10
    # control: each micro-batch normalised by its own counts (averaged over GA and ranks) is not the step's gradient
    fresh = [[collate(p, world=2)[rank] for p in parts] for rank in range(2)]  # without the step's normalisers
    per_micro = [loss_and_grad(stand_in(AsyncGRPOTrainer, objective), model, fresh[r], steps=False)[1]
                 for r in range(2)]
    assert rel((per_micro[0] + per_micro[1]) / 4, model.table.grad) > 1e-2


def test_trls_own_loss_is_not_the_step_token_mean_under_accumulation():
    """What the exact normalisers change: TRL divides by each micro-batch's tokens and by GA."""
    samples = make_samples(seed=2)
    batches = [collate(samples[:2])[0], collate(samples[2:])[0]]
    model = TableModel(2)
    trl_loss, trl_grad = loss_and_grad(stand_in(trl_async.AsyncGRPOTrainer, ga=2), model, batches, steps=False)
    our_loss, our_grad = loss_and_grad(stand_in(AsyncGRPOTrainer, pgzoo.get("bnpo"), ga=2), model, batches)
    model.zero_grad()
    pgzoo.get("bnpo")(reference_batch(model, samples)).loss.backward()
    assert rel(our_grad, model.table.grad) < 1e-10
    assert rel(trl_grad, model.table.grad) > 1e-2


def test_packed_layout_keeps_each_term_and_its_gradient():
    seg = torch.tensor([2, 2, 5, 5, 5, 2, 7])  # any ids, not contiguous
    layout = PackedLayout.of(seg)
    assert (layout.num_rows, layout.width) == (3, 3)
    x = torch.arange(7.0, requires_grad=True)
    rows = layout.rows_of(x)
    assert rows.tolist() == [[0, 1, 5], [2, 3, 4], [6, 0, 0]]
    assert layout.mask().sum() == 7 and layout.per_row(x.detach()).tolist() == [0, 2, 6]
    rows.sum().backward()
    assert x.grad.tolist() == [1.0] * 7


def test_metrics_reduce_over_a_logging_window_as_pgzoo_declares():
    """Every name the objective logs comes out of TRL's own window reducer as its declared kind."""
    samples = make_samples()
    t = stand_in(AsyncGRPOTrainer, pgzoo.get("minirl"))
    model = TableModel()
    for inputs in (collate(samples[:4])[0], collate(samples[4:])[0]):
        t.compute_loss(model, inputs)
    sink = t._metrics["train"]
    names = [k for k in sink if k.startswith("pgzoo/")]
    assert "pgzoo/first_order/gap_total" in names and "pgzoo/ratio/max" in names and len(sink["entropy"]) == 2
    for key in names:
        name = key.removeprefix("pgzoo/")
        raw = [v[0] if isinstance(v, tuple) else v for v in sink[key]]
        want = {"max": max, "min": min, "mean": lambda v: sum(v) / len(v)}[reduce_kind(name)](raw)
        got = trl_async._reduce_metric(key, sink[key])
        assert got == pytest.approx(want, nan_ok=True), key
    assert window_value("first_order/gap_total", 0.5) == (0.5, 1.0) and window_value("ratio/max", 2.0) == 2.0


def config(tmp_path, **kw) -> AsyncGRPOConfig:
    return AsyncGRPOConfig(output_dir=str(tmp_path), bf16=False, use_cpu=True, report_to=[], **kw)


def test_refusals_name_the_setting(tmp_path, caplog):
    with pytest.raises(ConfigError, match="AsyncGRPOConfig.epsilon_high=0.3 but objective 'minirl' has eps_high"):
        objective_for_async("minirl", config(tmp_path, epsilon_high=0.3))
    with pytest.raises(ConfigError, match="AsyncGRPOConfig.epsilon=0.1 but objective 'cross-entropy' has no clip"):
        objective_for_async("cross-entropy", config(tmp_path, epsilon=0.1))
    assert objective_for_async("dapo", config(tmp_path, epsilon_high=0.28)).name == "dapo"  # agrees: fine
    # refused at construction, before TRL loads a model or reaches a server
    with pytest.raises(ConfigError, match="beta=0.04.*no reference model"):
        AsyncGRPOTrainer(model="no/such-model", loss=pgzoo.get("grpo", beta=0.04), args=config(tmp_path))
    with pytest.raises(ConfigError, match="a-star-po.*its own term.*loads no reference model"):
        check_async_objective(pgzoo.get("a-star-po"))
    with pytest.raises(ConfigError, match="takes a pgzoo objective or its name"):
        AsyncGRPOTrainer(model="no/such-model", loss=3, args=config(tmp_path))
    with caplog.at_level(logging.WARNING, logger="pgzoo.adapters.trl"):
        check_async_objective(pgzoo.get("minirl"))
        assert "uses the sampler's logprobs mu as pi_old" in caplog.text
        caplog.clear()
        check_async_objective(pgzoo.get("minirl-no-is"))
        assert not caplog.text


class RolloutWorker:
    """TRL's rollout-worker protocol without a server: a queue of ready samples."""

    def __init__(self, samples):
        self.rollout_buffer, self.metrics_queue = queue.Queue(), queue.Queue()
        for s in samples:
            self.rollout_buffer.put(trl_async.RolloutSample(
                prompt=[], completion=[], input_ids=s["input_ids"].numpy(),
                completion_mask=s["completion_mask"].numpy(),
                old_log_probs=s["old_log_probs"].numpy(), advantage=s["advantage"], model_version=0,
                group_id=s["group_id"], metrics={"reward": 1.0}))

    def start(self):
        pass

    stop = start

    def update_model_version(self, model_version):
        pass

    def check_health(self, stale_after_s):
        pass


class WeightTransfer:
    """TRL's weight-transfer protocol without NCCL: counts the tensors it is sent."""

    sent = 0

    def init_weight_transfer(self):
        pass

    pause = resume = destroy = init_weight_transfer

    def send_weights(self, iterator):
        self.sent += sum(1 for _ in iterator)


def test_trains_through_trls_loop_with_the_transport_mocked(tmp_path, monkeypatch):
    """TRL's whole training loop (rollout queue, batcher, collator, dispatcher, get_batch_samples, callbacks,
    logging) on CPU: the server and NCCL replaced by in-process stand-ins and the packed forward by the table model
    (TRL's tree attention needs CUDA). TRL's peak-FLOPs query calls CUDA unconditionally, so it answers None here
    (no MFU metric). Two optimizer steps of two micro-batches; the first step's gradient is the objective's on its
    samples."""
    monkeypatch.setattr(trl_async, "get_peak_flops_per_device", lambda accelerator, dtype: None)
    from transformers import LlamaConfig, LlamaForCausalLM
    from pgzoo.models import build_tokenizer

    tok = build_tokenizer()
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path / "m")
    # 2 steps × GA 2 × 4 per micro-batch = 16 samples, and 4 more: accelerate's dispatcher fetches one micro-batch
    # ahead, and with the queue empty TRL's dataset would wait for the worker forever
    samples = make_samples(seed=3) + make_samples(seed=4) + make_samples(seed=5)[:2]
    args = config(tmp_path / "out", per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=2,
                  token_budget=0, max_completion_length=MAX_LEN, learning_rate=0.0, save_strategy="no",
                  gradient_checkpointing=False, dtype="float32")
    trainer = AsyncGRPOTrainer(model=str(tmp_path / "m"), loss="minirl", args=args, processing_class=tok,
                               train_dataset=pgzoo_dataset(), rollout_worker=RolloutWorker(samples),
                               weight_transfer=WeightTransfer())
    table = TableModel(3)
    table.config = trainer.model.config  # TRL's throughput metrics read the model's config
    trainer.model = trainer.model_wrapped = table
    grads = []
    table.table.register_hook(lambda g: grads.append(g.clone()))
    trainer.train()
    assert trainer.state.global_step == 2 and trainer.weight_transfer.sent == 3  # at train begin, after each step
    logged = {k for entry in trainer.state.log_history for k in entry}
    assert {"pgzoo/clip/fraction", "pgzoo/is/weight_mean", "entropy", "reward"} <= logged
    assert "clip_ratio/region_mean" not in logged  # TRL's loss did not run
    step1 = grads[0] + grads[1]
    model = TableModel(3)
    pgzoo.get("minirl")(reference_batch(model, samples[:8])).loss.backward()
    assert rel(step1, model.table.grad) < 1e-10


def pgzoo_dataset():
    from datasets import Dataset

    return Dataset.from_dict({"prompt": ["2+2=", "3+1="]})
