"""TRL's ``AsyncGRPOTrainer`` with any pgzoo objective as its loss and exact global normalisers.

    import pgzoo
    from pgzoo.adapters.trl import AsyncGRPOTrainer
    from trl.experimental.async_grpo import AsyncGRPOConfig

    trainer = AsyncGRPOTrainer(loss=pgzoo.get("minirl"), model="Qwen/Qwen3-0.6B", reward_funcs=reward,
                               args=AsyncGRPOConfig(...), train_dataset=dataset)   # a vLLM server, as TRL needs
    trainer.train()

Only the loss changes: the vLLM server, the rollout worker (generation, rewards, advantages), the weight transfer,
the packing and the logging stay TRL's (tested with TRL 1.16). Per packed micro-batch the adapter runs TRL's own
forward and builds a :class:`pgzoo.TokenBatch` from its loss terms, one row per sample (:mod:`.packed`)::

    logprobs          log π_θ of each trained token (TRL's packed forward, fused LM head after temperature), with grad
    old_logprobs      TRL's ``old_log_probs``: the vLLM server's sampling logprobs μ (TRL computes no π_θold)
    rollout_logprobs  the same μ
    mask              the sample's trained tokens (TRL's ``completion_mask``; tool output is not trained)
    advantages        the rollout worker's advantage of the sample (group (r − mean)/(std + 1e-8), population std)
    entropies         TRL's fused-head entropies (with grad), when one of the objective's options needs them
    num_sequences     global count over every micro-batch and process of this optimizer step, ÷ num_processes
    num_tokens        likewise
    max_tokens        ``max_completion_length`` (Dr. GRPO's constant L)

π_θold. TRL's async trainer has no old-logprob pass: the ratio of its loss is π_θ/μ with μ the logprobs vLLM
returned when it sampled, at a policy version up to ``max_staleness`` weight syncs behind θ. So the adapter passes μ
as both ``old_logprobs`` and ``rollout_logprobs``: the ratio r = π_θ/μ carries the policy staleness *and* the
training–inference mismatch, and the training–inference factor π_θold/μ of MiniRL (or any ``correction=``) is 1.

Normalisers. transformers' training loop fetches an optimizer step's gradient-accumulation micro-batches before the
first forward (``get_batch_samples``); the adapter counts their samples and loss terms there, sums the counts over
processes (one collective per optimizer step) and hands each micro-batch the step's totals ÷ num_processes
(:mod:`.normalisers` says why that is exact). TRL's own loss divides by each micro-batch's token count and by the
accumulation steps, which equals the step's token mean only when every micro-batch holds as many tokens.

What the adapter refuses is in :mod:`.checks` (``check_async_objective``) and :mod:`.config`
(``objective_for_async``). Metrics: every objective metric is logged as ``pgzoo/<name>`` next to TRL's own keys.
Guide: docs/trl.md, "Asynchronous (TRL's AsyncGRPOTrainer)".
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import torch

from pgzoo.batch import TokenBatch
from pgzoo.errors import require
from pgzoo.objectives.diagnostics import entropy_metrics

require("trl", "trl")
from trl.experimental.async_grpo import AsyncGRPOTrainer as _TRLAsyncGRPOTrainer  # noqa: E402

from pgzoo.adapters.trl.checks import (check_async_objective, check_trl_version,  # noqa: E402
                                      degenerate_rollout_logprobs)
from pgzoo.adapters.trl.config import objective_for_async  # noqa: E402
from pgzoo.adapters.trl.metrics import reduce_kind, reduce_over_processes  # noqa: E402
from pgzoo.adapters.trl.normalisers import per_process  # noqa: E402
from pgzoo.adapters.trl.packed import PackedLayout, packed_counts  # noqa: E402

__all__ = ["AsyncGRPOTrainer", "NORMALISERS_KEY", "window_value"]

NORMALISERS_KEY = "pgzoo_normalisers"  # (N_seq / W, N_tok / W) of the optimizer step, carried by each micro-batch


def window_value(name: str, value: float) -> float | tuple[float, float]:
    """``value`` of the metric ``name`` as TRL's async metric sink must hold it to reduce it over a logging window by
    :func:`~pgzoo.adapters.trl.metrics.reduce_kind`. TRL's sink picks the reduction from the name's last words
    (``total``: sum, ``max``: max, ``min``: min, else mean) and averages ``(numerator, denominator)`` pairs as
    Σnum/Σden; a mean whose name holds one of those words (``first_order/gap_total``) goes in as ``(value, 1)``."""
    words = name.rsplit("/", 1)[-1].split("_")
    trl_kind = ("sum" if "total" in words else "max" if "max" in words else "min" if "min" in words else "mean")
    return value if trl_kind == reduce_kind(name) else (value, 1.0)


class AsyncGRPOTrainer(_TRLAsyncGRPOTrainer):
    """TRL's ``AsyncGRPOTrainer`` whose loss is a pgzoo objective (see the module docstring for the exact semantics).

    Args:
        loss: a pgzoo objective (``pgzoo.get("minirl")``) or its registered name. ``None``: TRL's own loss (PPO
            clip, token mean) as pgzoo's ``bnpo`` with ``AsyncGRPOConfig``'s ``epsilon``/``epsilon_high``
            (:func:`pgzoo.adapters.trl.config.objective_for_async`).
        *args, **kwargs: TRL's ``AsyncGRPOTrainer`` arguments (``model``, ``reward_funcs``, ``args``,
            ``train_dataset``, ``rollout_worker``, ``weight_transfer``, ...).

    Raises:
        ConfigError: an objective the trainer cannot feed (β ≠ 0: no reference model), or a clip range set in both
            ``AsyncGRPOConfig`` and the objective with different values; the message names the setting and the fix.
        DependencyError: TRL outside the tested range.
    """

    degenerate_gap = 1.0  # nats: mean |log μ − log π| on the first batch above which a warning says μ looks wrong

    def __init__(self, *args: Any, loss: Any = None, **kwargs: Any):
        check_trl_version()
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        self.objective = objective_for_async(loss, config)
        check_async_objective(self.objective)
        self._pgzoo_mu_checked = False  # the first training batch's μ is checked once (degenerate_rollout_logprobs)
        super().__init__(*args, **kwargs)

    # ------------------------------------------------------------------------------------------ normalisers
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if batch_samples:
            local = torch.stack([packed_counts(b["segment_id"], b["token_index"]) for b in batch_samples]).sum(0)
            totals = self.accelerator.reduce(local.to(self.accelerator.device), reduction="sum").tolist()
            shares = per_process(totals[0], totals[1], self.accelerator.num_processes)
            for batch in batch_samples:
                batch[NORMALISERS_KEY] = shares
        return batch_samples, num_items_in_batch

    # ------------------------------------------------------------------------------------------ the loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # 1. TRL 1.16's packed forward, as its compute_loss runs it: strip the inter-rank padding, one packed row
        mask_bool = inputs["attention_mask"].bool()
        selected = inputs["token_index"] >= 0
        input_ids = inputs["input_ids"][mask_bool].unsqueeze(0)
        position_ids = inputs["position_ids"][mask_bool].unsqueeze(0)
        shift_labels = inputs["shift_labels"][mask_bool].unsqueeze(0)
        token_index = inputs["token_index"][selected]
        old_log_probs = inputs["old_log_probs"][selected]
        advantages = inputs["advantages"][selected]
        segment_id = inputs["segment_id"][selected]
        tree_kwargs = {
            key: inputs[key][inputs[key] >= 0] for key in ("tree_kv_index", "tree_cu_seqlens_q", "tree_cu_seqlens_k")
        }
        tree_kwargs["tree_max_seqlen_q"], tree_kwargs["tree_max_seqlen_k"] = inputs["tree_max_seqlens"][0].tolist()
        forward_start = time.time()
        router_kwargs = {"output_router_logits": True} if self.aux_loss_enabled else {}
        outputs = model(input_ids=input_ids, position_ids=position_ids, shift_labels=shift_labels,
                        fused_lm_head=True, **router_kwargs, **tree_kwargs)
        log_probs = outputs.log_probs.flatten()[token_index]
        entropy = outputs.entropy.flatten()[token_index]
        self._last_forward_time_s = time.time() - forward_start

        # 2. one TokenBatch row per sample, with this optimizer step's global normalisers
        counted = torch.ones_like(token_index, dtype=torch.bool)
        if token_index.numel() == 0:
            # Nothing trained on this process: one masked term keeps the loss connected to the model and the metric
            # names the same on every process (they are gathered together).
            segment_id = torch.zeros(1, dtype=torch.long, device=token_index.device)
            counted = torch.zeros(1, dtype=torch.bool, device=token_index.device)
            log_probs, entropy = outputs.log_probs.flatten()[:1], outputs.entropy.flatten()[:1]
            old_log_probs, advantages = log_probs.detach() * 0.0, log_probs.detach() * 0.0
        layout = PackedLayout.of(segment_id)
        mask = layout.rows_of(counted)
        mu = layout.rows_of(old_log_probs)
        lp = layout.rows_of(log_probs)
        ents = layout.rows_of(entropy)
        if not self._pgzoo_mu_checked and bool(counted.any()):
            self._pgzoo_mu_checked = True  # one host sync, on the first batch only
            problem = degenerate_rollout_logprobs(mu, lp.detach(), mask, self.degenerate_gap)
            if problem is not None:
                warnings.warn(f"pgzoo: the sampling logprobs (μ) of the first training batch look wrong: {problem}",
                              RuntimeWarning, stacklevel=2)
        # outside the training loop (no step counts): this batch's own counts, at least 1
        num_sequences, num_tokens = inputs.get(NORMALISERS_KEY) or per_process(
            layout.num_rows if bool(counted.any()) else 0, counted.sum().item(), 1)
        batch = TokenBatch(
            logprobs=lp,
            mask=mask,
            advantages=layout.per_row(advantages),
            old_logprobs=mu,
            rollout_logprobs=mu,
            num_sequences=num_sequences,
            num_tokens=num_tokens,
            max_tokens=self.args.max_completion_length,
            entropies=ents if "entropies" in self.objective.requires else None,
        )
        out = self.objective(batch)
        loss = out.loss
        world_size = self.accelerator.num_processes
        if self.aux_loss_enabled:  # MoE load-balancing loss, scaled for accumulation as TRL does
            aux_loss = outputs.aux_loss
            loss = loss + self.router_aux_loss_coef * aux_loss / self.current_gradient_accumulation_steps

        # 3. metrics: the objective's diagnostics under pgzoo/, TRL's entropy and aux_loss keys
        sink = self._metrics["train"]
        reduced = reduce_over_processes(self.accelerator, {**out.metrics, **entropy_metrics(ents.detach(), mask)})
        for name, value in reduced.items():
            sink[f"pgzoo/{name}"].append(window_value(name, value))
        sink["entropy"].append(reduced["entropy/mean"])
        if self.aux_loss_enabled:
            gathered_aux = self.accelerator.reduce(aux_loss.detach().to(torch.float32), reduction="sum")
            sink["aux_loss"].append((gathered_aux / world_size).item())

        # 4. TRL's per-step accounting (flushed by its _log_step_metrics): batch-wide counts, no collective
        n_forward_tokens = float(inputs["global_n_forward_tokens"][0])
        mean_seq_len = float(inputs["mean_seq_len"][0])
        self._step_forward_tokens += n_forward_tokens
        self._step_trained_tokens += float(inputs["global_n_tokens"][0])
        self._step_seq_len_weighted += mean_seq_len * n_forward_tokens
        self._step_samples += n_forward_tokens / mean_seq_len
        self._step_forward_s += self._last_forward_time_s
        return loss
