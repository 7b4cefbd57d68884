"""TRL's ``GRPOTrainer`` with any pgzoo objective as its loss, exact global normalisers and MoE routing replay.

    import pgzoo
    from pgzoo.adapters.trl import GRPOTrainer, EngineRollout
    from trl import GRPOConfig

    trainer = GRPOTrainer(loss=pgzoo.get("minirl"), model=model, reward_funcs=reward, args=GRPOConfig(...),
                          train_dataset=dataset, rollout_func=EngineRollout(pgzoo.rollout.VLLMEngine(path)))
    trainer.train()

Only the loss changes. Generation, rewards, logging, checkpointing and distribution stay TRL's (tested with TRL
1.16). Per micro-batch the adapter builds a :class:`pgzoo.TokenBatch` from TRL's tensors::

    logprobs          per-token log π_θ of the completion (TRL's forward, with grad)
    old_logprobs      TRL's ``old_per_token_logps`` (None when TRL skips that pass: the step is on-policy)
    rollout_logprobs  TRL's ``sampling_per_token_logps``: μ from ``rollout_func`` or TRL's vLLM
    ref_logprobs      TRL's ``ref_per_token_logps`` (when β ≠ 0)
    mask              completion_mask · tool_mask
    advantages        recomputed with ``pgzoo.advantages`` (the objective's ``default_advantage``) from TRL's rewards
    num_sequences     global count over every micro-batch and process of this optimizer step, ÷ num_processes
    num_tokens        likewise
    max_tokens        ``max_completion_length`` (Dr. GRPO's constant L)

Why those normalisers are exact: :mod:`pgzoo.adapters.trl.normalisers`. The counts of every window of GA
micro-batches are known when TRL generates (it buffers ``steps_per_generation`` micro-batches and reuses them
``num_iterations`` times), so the adapter requires ``steps_per_generation · num_iterations`` to be a multiple of GA.

Routing replay (MoE). ``routing_replay="R2"`` records each token's experts during TRL's old-logprob pass (forcing
that pass when TRL would skip it) and replays them in every loss pass of that batch; ``"R3"`` replays the routes
the rollout engine used (``EngineRollout`` with ``return_routes``) in the old-logprob pass and in the loss passes.
Replay raises when a forward misses an MoE layer; ``pgzoo/routing/layers_hit`` logs the layers forced and
``pgzoo/routing/drift_update`` / ``drift_rollout`` the share of (token, layer) slots whose natural expert set differs
from the replayed one (see :class:`pgzoo.routing.RoutingReplay`).

Importance-sampling corrections are the objective's business: the adapter never multiplies TRL's vLLM ratio in. What
the adapter refuses (untested TRL, settings it cannot honour exactly, degenerate μ) is in
``pgzoo.adapters.trl.checks``. TRL's loss-shaping settings become objective options (``pgzoo.adapters.trl.config``);
``loss=None`` takes TRL's ``loss_type`` itself as a pgzoo objective. Entropies reach the objective when one of its
options needs them. Metrics: every objective metric is logged as ``pgzoo/<name>`` next to TRL's own keys. Full guide:
docs/trl.md.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch

from pgzoo import advantages as pg_advantages
from pgzoo.batch import TokenBatch
from pgzoo.errors import ConfigError, RoutingError, require
from pgzoo.routing.trainer import RoutingReplay

require("trl", "trl")
from trl import GRPOTrainer as _TRLGRPOTrainer  # noqa: E402

from pgzoo.adapters.trl.checks import (check_beta, check_trainer_settings,  # noqa: E402
                                      check_trl_version, degenerate_rollout_logprobs)
from pgzoo.adapters.trl.config import objective_for  # noqa: E402
from pgzoo.adapters.trl.metrics import reduce_over_processes  # noqa: E402
from pgzoo.adapters.trl.normalisers import mask_counts, per_process  # noqa: E402
from pgzoo.adapters.trl.rollout import align_routes  # noqa: E402

__all__ = ["GRPOTrainer"]

ROUTES_KEY = "pgzoo_routes"
MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                   "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


class GRPOTrainer(_TRLGRPOTrainer):
    """TRL's ``GRPOTrainer`` whose loss is a pgzoo objective (see the module docstring for the exact semantics).

    Args:
        loss: a pgzoo objective (``pgzoo.get("minirl")``) or its registered name; ``GRPOConfig``'s loss-shaping
            settings (``top_entropy_quantile``, ``off_policy_mask_threshold``, ``delta``, ``entropy_coef``,
            ``importance_sampling_level``, ``beta`` with ``use_bias_correction_kl``) are mapped onto its options
            (:func:`pgzoo.adapters.trl.config.apply_trl_settings`; an option it lacks raises naming the objectives
            that have it). ``None``: TRL's ``loss_type`` and settings as a pgzoo objective
            (:func:`pgzoo.adapters.trl.config.objective_from_trl`).
        routing_replay: ``"R2"``, ``"R3"`` or ``None``. R3 needs ``rollout_func=EngineRollout(engine)`` with an
            engine that returns routes.
        advantage: advantage estimator in :mod:`pgzoo.advantages` (default: the objective's
            ``default_advantage``), or ``"trl"`` to keep TRL's own advantages (``GRPOConfig.scale_rewards``).
        rollout_logprobs: where μ (the sampler's logprobs) comes from: ``"engine"`` (``rollout_func`` or TRL's
            vLLM) or ``"old"`` (π_θold: exact for TRL's transformers generation, where the sampler *is* the
            training model). ``None`` (default): ``"engine"`` when there is an engine, else ``"old"`` for an
            objective that needs μ (logged once at info level).
        *args, **kwargs: TRL's ``GRPOTrainer`` arguments (``model``, ``reward_funcs``, ``args``, ``train_dataset``,
            ``rollout_func``, ...).

    Raises:
        ConfigError: a setting the adapter cannot honour exactly; the message names the setting and the fix.
        DependencyError: TRL outside the tested range.
    """

    degenerate_gap = 1.0  # nats: mean |log μ − log π| on the first batch above which a warning says μ looks wrong

    def __init__(
        self,
        *args: Any,
        loss: Any = None,
        routing_replay: str | None = None,
        advantage: str | None = None,
        rollout_logprobs: str | None = None,
        **kwargs: Any,
    ):
        check_trl_version()
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        self.objective = objective_for(loss, config)
        self._rr = RoutingReplay(routing_replay)  # validates the mode
        self.routing_replay = self._rr.mode
        self.advantage = advantage if advantage is not None else self.objective.default_advantage
        if self.advantage != "trl" and self.advantage not in pg_advantages.available():
            raise ConfigError(
                f"advantage={advantage!r} is not an estimator in pgzoo.advantages "
                f"({', '.join(pg_advantages.available())}) nor 'trl'"
            )
        needs = () if self.advantage == "trl" else getattr(pg_advantages.registry.get(self.advantage), "inputs", ())
        if needs:  # the adapter gives an estimator TRL's rewards, groups and lengths only
            raise ConfigError(f"advantage={self.advantage!r} needs inputs the adapter does not produce "
                              f"({', '.join(needs)}); pick one of {', '.join(pg_advantages.trainer_estimators())}")
        if rollout_logprobs not in (None, "engine", "old"):
            raise ConfigError(f"rollout_logprobs={rollout_logprobs!r}: use None (automatic, default), 'engine' or "
                              "'old'")
        self.rollout_logprobs = rollout_logprobs
        self._pgzoo_window: list[tuple[float, float]] | None = None
        self._pgzoo_gen_state: dict | None = None  # set while TRL generates and scores a batch
        self._pgzoo_rewards: torch.Tensor | None = None
        self._pgzoo_pending_rollouts = None
        self._pgzoo_deferred = contextlib.ExitStack()
        self._pgzoo_mu_checked = False  # the first training batch's μ is checked once (degenerate_rollout_logprobs)
        self.last_layers_hit: int | None = None  # MoE layers forced in the latest loss pass (R2/R3)
        check_beta(self.objective, getattr(config, "beta", 0.0))  # before TRL loads a reference model for β != 0
        super().__init__(*args, **kwargs)
        check_trainer_settings(self)  # also resolves rollout_logprobs=None

    # ------------------------------------------------------------------------------------------ generation side
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._pgzoo_rewards = rewards_per_func  # gathered over processes: [N_global, num_reward_funcs]
        return rewards_per_func

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **kwargs):
        state = self._pgzoo_gen_state
        # Only TRL's old-logprob pass is intercepted: the first policy forward under no_grad during generation.
        if (state is None or not self._rr.enabled or state["old_pass"] or model is not self.model
                or torch.is_grad_enabled()):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **kwargs)
        if any(v is not None for v in kwargs.values()):
            raise RoutingError("routing replay in the TRL adapter supports text-only batches (no images)")
        state["old_pass"] = True
        self._pgzoo_start_batch(input_ids.size(1) - logits_to_keep, logits_to_keep)
        unwrapped = self.accelerator.unwrap_model(model)
        step = batch_size or input_ids.size(0)
        logps, ents, auxes = [], [], []
        for start in range(0, input_ids.size(0), step):
            rows = slice(start, start + step)
            # R2: record θ_old's routes per row; R3: replay the rollout engine's routes
            with self._rr.old_pass(unwrapped, rows=rows, mask=attention_mask[rows].bool()):
                lp, ent, aux = super()._get_per_token_logps_and_entropies(
                    model, input_ids[rows], attention_mask[rows], logits_to_keep,
                    compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss)
            logps.append(lp)
            ents.append(ent)
            auxes.append(aux)
        logps = torch.cat(logps)
        ents = torch.cat(ents) if compute_entropy else None
        aux = torch.stack(auxes).mean() if compute_aux_loss else None
        return logps, ents, aux

    def _pgzoo_start_batch(self, prompt_len: int, completion_len: int) -> None:
        rollouts = self._pgzoo_pending_rollouts
        rollout_routes = None
        if rollouts is not None and rollouts.routes is not None:
            rollout_routes = align_routes(rollouts, prompt_len, completion_len)
        elif self._rr.needs_rollout_routes:
            raise RoutingError("R3: no rollout routes for this batch (rollout_func must be an EngineRollout)")
        self._rr.start_batch(rollout_routes)

    def _generate_and_score_completions(self, inputs):
        self._pgzoo_gen_state = {"old_pass": False}
        self._pgzoo_pending_rollouts = None
        try:
            output = super()._generate_and_score_completions(inputs)
            if self._rr.enabled:
                self._pgzoo_attach_routes(output)
        finally:
            self._pgzoo_gen_state = None
            self._pgzoo_pending_rollouts = None
        if self.advantage != "trl":
            self._pgzoo_recompute_advantages(output)
        return output

    def _pgzoo_attach_routes(self, output: dict) -> None:
        prompt_len, completion_len = output["prompt_ids"].size(1), output["completion_ids"].size(1)
        if not self._pgzoo_gen_state["old_pass"]:
            if self._rr.mode == "R2":
                # TRL skipped the old-logprob pass (on-policy step): run it here so that R2 has θ_old's routes.
                ids = torch.cat([output["prompt_ids"], output["completion_ids"]], 1)
                am = torch.cat([output["prompt_mask"], output["completion_mask"]], 1)
                training = self.model.training
                bs = self.args.per_device_train_batch_size if training else self.args.per_device_eval_batch_size
                with torch.no_grad():
                    old, _, _ = self._get_per_token_logps_and_entropies(self.model, ids, am, completion_len,
                                                                        batch_size=bs)
                output["old_per_token_logps"] = old
            else:
                self._pgzoo_start_batch(prompt_len, completion_len)
        routes = self._rr.routes
        if routes is None or tuple(routes.shape[:2]) != (output["prompt_ids"].size(0), prompt_len + completion_len):
            raise RoutingError(f"routes {None if routes is None else tuple(routes.shape)} do not match the batch")
        # A compact host copy (expert ids and -1 fit int16) that TRL shuffles and splits along with the batch.
        output[ROUTES_KEY] = routes.to("cpu", torch.int16)

    def _pgzoo_recompute_advantages(self, output: dict) -> None:
        rpf, self._pgzoo_rewards = self._pgzoo_rewards, None
        mode = "train" if self.model.training else "eval"
        group = self.num_generations if mode == "train" else self.num_generations_eval
        rewards = (rpf * self.reward_weights.to(rpf.device).unsqueeze(0)).nansum(dim=1)
        scorable = ~torch.isnan(rpf).all(dim=1)  # TRL: all reward funcs None -> unscorable, advantage 0
        group_ids = torch.arange(rewards.numel(), device=rewards.device) // group
        adv = torch.zeros_like(rewards)
        # completion lengths of every process's rows (OPO's baseline, REINFORCE++'s token weights); a completion
        # TRL masked out entirely (mask_truncated_completions) still counts as one token there
        lengths = self.accelerator.gather(output["completion_mask"].sum(1)).to(rewards.device).clamp_min(1)
        if bool(scorable.any()):
            adv[scorable] = pg_advantages.compute(self.advantage, rewards[scorable], group_ids=group_ids[scorable],
                                                  lengths=lengths[scorable])
        n = output["advantages"].shape[0]
        start = self.accelerator.process_index * n
        output["advantages"] = adv[start:start + n].to(output["advantages"])
        logged = self._logs["advantages"]  # TRL logged its own advantages for the completions table: replace them
        for _ in range(min(len(logged), adv.numel())):
            logged.pop()
        logged.extend(adv.tolist())

    # ------------------------------------------------------------------------------------------ normalisers
    def _prepare_inputs(self, generation_batch):
        if not self.model.training:
            return super()._prepare_inputs(generation_batch)
        cycle = self.args.steps_per_generation * self.num_iterations
        fresh = self._step % cycle == 0 or self._buffered_inputs is None
        inputs = super()._prepare_inputs(generation_batch)
        if fresh:
            self._pgzoo_window = self._window_normalisers(self._buffered_inputs)
        return inputs

    def _window_normalisers(self, buffered: list[dict]) -> list[tuple[float, float]]:
        """(N_seq, N_tok) / num_processes of the optimizer step each micro-step of this rollout cycle belongs to."""
        per_slice = [mask_counts(b["completion_mask"] if b.get("tool_mask") is None
                                 else b["completion_mask"] * b["tool_mask"]) for b in buffered]
        counts = self.accelerator.gather(torch.stack(per_slice).unsqueeze(0))  # [W, S, 2]
        counts = counts.view(-1, len(buffered), 2).sum(0).tolist()  # host sync, once per rollout
        ga, spg = self.args.gradient_accumulation_steps, self.args.steps_per_generation
        cycle, world = spg * self.num_iterations, self.accelerator.num_processes
        totals: dict[int, list[float]] = {}
        for t in range(cycle):
            tot = totals.setdefault(t // ga, [0.0, 0.0])
            tot[0] += counts[t % spg][0]
            tot[1] += counts[t % spg][1]
        return [per_process(*totals[t // ga], world) for t in range(cycle)]

    # ------------------------------------------------------------------------------------------ the loss
    def training_step(self, model, inputs, num_items_in_batch):
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            self._pgzoo_deferred.close()  # replay contexts kept open through backward (gradient checkpointing)

    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        logits_to_keep = completion_ids.size(1)
        mask = completion_mask if inputs.get("tool_mask") is None else completion_mask * inputs["tool_mask"]
        mask = mask.bool()

        # 1. current-policy logprobs (with grad), replaying this batch's routes when asked
        replay_handle = None
        with contextlib.ExitStack() as stack:
            if self._rr.enabled:
                routes = inputs.get(ROUTES_KEY)
                if routes is None:
                    raise RoutingError(f"routing_replay={self._rr.mode!r} but the batch carries no routes")
                ctx = self._rr.update_pass(self.accelerator.unwrap_model(model), mask=attention_mask.bool(),
                                           routes=routes.to(input_ids.device).long())
                # With gradient checkpointing, backward recomputes the MoE layers: keep replaying until it ran.
                keep_open = mode == "train" and self.args.gradient_checkpointing
                replay_handle = (self._pgzoo_deferred if keep_open else stack).enter_context(ctx)
            per_token_logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, compute_entropy=True,
                compute_aux_loss=self.aux_loss_enabled, **{k: inputs.get(k) for k in MULTIMODAL_KEYS})

        # 2. the TokenBatch, with this optimizer step's global normalisers
        old = inputs.get("old_per_token_logps")
        mu = inputs.get("sampling_per_token_logps")
        if self.rollout_logprobs == "old":  # the training model sampled: μ_θold = π_θold
            mu = old if old is not None else per_token_logps.detach()
        if mode == "train" and not self._pgzoo_mu_checked and self.rollout_logprobs == "engine" and mu is not None:
            self._pgzoo_mu_checked = True  # one host sync, on the first batch only
            problem = degenerate_rollout_logprobs(mu, per_token_logps.detach(), mask, self.degenerate_gap)
            if problem is not None:
                warnings.warn(f"pgzoo: the rollout logprobs (μ) of the first training batch look wrong: {problem}",
                              RuntimeWarning, stacklevel=2)
        num_sequences = num_tokens = None  # eval (or a call outside TRL's loop): this batch's own counts
        if mode == "train" and self._pgzoo_window is not None:
            cycle = self.args.steps_per_generation * self.num_iterations
            num_sequences, num_tokens = self._pgzoo_window[self._step % cycle]
        batch = TokenBatch(
            logprobs=per_token_logps,
            mask=mask,
            advantages=inputs["advantages"],
            old_logprobs=old,
            rollout_logprobs=mu,
            ref_logprobs=inputs.get("ref_per_token_logps"),
            num_sequences=num_sequences,
            num_tokens=num_tokens,
            max_tokens=self.max_completion_length,
            entropies=entropies if "entropies" in self.objective.requires else None,
        )
        out = self.objective(batch)
        loss = out.loss
        if self.aux_loss_enabled:  # MoE load-balancing loss, scaled for accumulation as TRL does
            normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1.0
            loss = loss + self.router_aux_loss_coef * aux_loss / normalizer
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather(aux_loss.detach()).mean().item())

        # 3. metrics: the objective's diagnostics, entropy, routing
        metrics = dict(out.metrics)
        from pgzoo.objectives.diagnostics import entropy_metrics

        metrics.update(entropy_metrics(entropies, mask))
        if replay_handle is not None:
            self.last_layers_hit = replay_handle.layers_hit
            metrics.update(self._rr.metrics())
        self._pgzoo_log(mode, metrics)
        return loss

    def _pgzoo_log(self, mode: str, metrics: dict[str, torch.Tensor]) -> None:
        for name, value in reduce_over_processes(self.accelerator, metrics).items():  # one collective, one sync
            self._metrics[mode][f"pgzoo/{name}"].append(value)
        if "entropy/mean" in metrics:
            self._metrics[mode]["entropy"].append(self._metrics[mode]["pgzoo/entropy/mean"][-1])

