"""A GRPO-style RL loop as a LightningModule (manual optimisation): the paper's synchronous loop, one screen long.

Runbook. Each global step (one ``training_step``):

    1. rollout      this rank's share of B prompts x G completions from the rollout engine, with μ logprobs;
                    moved once onto the module's device (DAPO's dynamic sampling: more draws until B groups whose
                    rewards differ; pgzoo.adapters.lightning.sampling). Asynchronously (rollout.max_staleness = k
                    >= 1) the step's rows were sampled ahead by an older version (at most k behind), and the engine
                    samples the next steps in a background thread while steps 2-5 run (pgzoo.adapters.lightning.pipeline)
    2. rewards      the task's verifiable reward per completion (+ DAPO's overlong penalty when asked)
    3. advantages   the objective's default estimator (or the recipe's, with its options), over the whole step: one
                    per completion, or per token (reinforce++ with gamma < 1); truncated completions leave the
                    loss with train.mask_truncated_completions
    4. old logprobs π_θold in the training engine, only off-policy (N > 1), for R2 (routes recorded there) or
                    asynchronously (π_θold = the current weights, μ = the older sampling weights' logprobs; with
                    train.old_policy=sampling the rows bring π_θold under their sampling weights, scored before
                    that version's first optimizer step: RLModule.score_sampled_ahead)
    5. updates      N mini-batches, one optimizer step each, R2/R3 routes replayed; normalisers are GLOBAL
                    (every rank and micro-batch of the mini-batch, summed through the strategy), so DDP/FSDP and
                    accumulation give the single-process gradient
    6. sync         the new weights into the rollout engine (:meth:`RLModule.sync_engine`), after the background
                    generation in flight (if any) finished
    7. log          one metrics row per step (Lightning loggers); checkpoints by :class:`HFCheckpoint`; a diverged
                    step (non-finite loss or gradient norm, entropy collapse) stops the run (pgzoo.adapters.lightning.guards)

    module = RLModule(policy, tokenizer, pgzoo.get("minirl"), pgzoo.tasks.get("arithmetic"), engine, recipe)
    trainer = lightning.Trainer(max_epochs=1, ..., callbacks=[HFCheckpoint(run_dir, every=10)])
    trainer.fit(module, train_dataloaders=step_loader(start=0, steps=40))

The loop reads the recipe's typed sections (``recipe.rollout``, ``recipe.train``, ``recipe.objective``,
``recipe.seed``; :mod:`pgzoo.recipes`). ``pgzoo train RECIPE`` (:mod:`pgzoo.adapters.lightning.run`) builds all of this; data
parallelism is Lightning's (``train.strategy``, :mod:`pgzoo.adapters.lightning.distributed`). Without a Trainer attached the same
:meth:`RLModule.update` runs stand-alone in one process.

Host syncs of a step (documented; none per micro-batch beyond these): the engine's CPU output and the decoded texts
(rollout, rewards), one transfer of the rows' lengths (trimming and token weights), one of the global normalisers of
all N mini-batches, the objective's finite-value check of each micro-batch (``TokenBatch.check_values``), and the
metrics row at the end of the step.
"""

from __future__ import annotations

import math
import time

import torch

from pgzoo.adapters.lightning.distributed import all_reduce_sum, is_sharded, shard_policy, world
from pgzoo.adapters.lightning.guards import check_step
from pgzoo.adapters.lightning.pipeline import staleness_metrics
from pgzoo.adapters.lightning.sampling import loss_mask, overlong_penalty, prompt_seed, sample_groups, shaping_metrics
from pgzoo.adapters.lightning.loop_data import (
    Accumulator,
    Lengths,
    RolloutBatch,
    attention_of,
    lengths_of,
    step_advantages,
    strip_padding,
    unsharded,
)
from pgzoo.batch import TokenBatch
from pgzoo.errors import ConfigError, EngineError, PgzooError, RoutingError, require
from pgzoo.objectives.diagnostics import entropy_metrics
from pgzoo.models.logprobs import completion_logprobs
from pgzoo.rollout.sync import prepare_sync, sync_weights
from pgzoo.rollout.sync_check import check_sync

L = require("lightning", "lightning")


class RLModule(L.LightningModule):
    """Policy-gradient RL on a Hugging Face causal LM with a pgzoo objective (see the module docstring).

    ``recipe`` is a :class:`pgzoo.recipes.Recipe` (None: the defaults); the loop reads its ``rollout``, ``train`` and
    ``objective`` sections and ``seed``.
    """

    def __init__(self, policy, tokenizer, objective, task, engine, recipe=None, ref_policy=None):
        super().__init__()
        if recipe is None:
            from pgzoo.recipes import Recipe

            recipe = Recipe()
        self.policy = policy
        self.tokenizer = tokenizer
        self.objective = objective
        self.task = task
        self.engine = engine
        self.recipe = recipe
        self.ref_policy = ref_policy
        self.automatic_optimization = False
        self.advantage_name = recipe.objective.advantage or objective.default_advantage
        self.history: list[dict[str, float]] = []  # one metrics row per step (also sent to the loggers)
        self.last_step = -1
        from pgzoo.adapters.lightning.lora import base_model

        self.architecture = type(base_model(policy)).__name__  # before FSDP2 renames it (FSDP<Name>); PEFT's base
        from pgzoo.routing import RoutingReplay

        self.replay = RoutingReplay(recipe.train.routing_replay)
        self.pipeline = None  # asynchronous rollouts (rollout.max_staleness >= 1)
        if recipe.rollout.max_staleness:
            from pgzoo.adapters.lightning.pipeline import RolloutPipeline

            check = getattr(engine, "check_background_generate", None)
            if check is not None:  # how this engine object was built may rule it out (the declaration cannot know)
                try:
                    check()
                except ConfigError as exc:
                    raise ConfigError(f"rollout.max_staleness={recipe.rollout.max_staleness}: {exc}") from None
            self.pipeline = RolloutPipeline(self.sample_step, recipe.rollout.max_staleness, recipe.train.steps,
                                            engine)

    @property
    def ro(self):
        return self.recipe.rollout

    @property
    def tr(self):
        return self.recipe.train

    @property
    def needs_old_logprobs(self) -> bool:
        return self.recipe.needs_old_logprobs

    # ------------------------------------------------------------------ parallelism and optimisation setup
    def configure_model(self) -> None:
        """FSDP2 (train.strategy=fsdp): shard the policy (and the frozen reference) per decoder layer and at the root
        over the strategy's data-parallel mesh. Called by Lightning's ModelParallelStrategy before the optimizer."""
        if self.recipe.strategy != "fsdp" or is_sharded(self.policy):
            return
        mesh = self.device_mesh["data_parallel"]
        kw = dict(activation_checkpointing=self.tr.activation_checkpointing, mixed_precision=self.tr.mixed_precision)
        shard_policy(self.policy, mesh, **kw)
        if self.ref_policy is not None:
            shard_policy(self.ref_policy, mesh, mixed_precision=self.tr.mixed_precision)

    def configure_optimizers(self):
        from pgzoo.adapters.lightning.lora import trainable_parameters  # LoRA: the adapters (+ modules_to_save) only

        t = self.tr
        opt = torch.optim.AdamW(trainable_parameters(self.policy), lr=t.lr, weight_decay=t.weight_decay,
                                betas=tuple(t.betas))
        warm = t.warmup_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
        return [opt], [sched]

    def _opt_and_sched(self):
        if self._trainer is not None:
            return self.optimizers(), self.lr_schedulers()
        if not hasattr(self, "_standalone"):
            (opt,), (sched,) = self.configure_optimizers()
            self._standalone = (opt, sched)
        return self._standalone

    def _strategy(self):
        return self._trainer.strategy if self._trainer is not None else None

    def _backward(self, loss: torch.Tensor) -> None:
        if self._trainer is None:
            loss.backward()
            return
        # DDP and FSDP average gradients over the W ranks; the loss already carries the GLOBAL normalisers, so the
        # single-process gradient is the SUM over ranks: scale by W (exact in floating point for W a power of 2)
        self.manual_backward(loss * world()[0] if world()[0] > 1 else loss)

    # ------------------------------------------------------------------ the loop
    def training_step(self, batch, batch_idx):
        step = int(batch)
        t0 = time.perf_counter()
        # 1-2. rollout and rewards: this rank's share of the B prompts, G completions each (host sync: the engine
        #      returns CPU ids), and the task's verifiable reward of each; with rollout.dynamic_sampling, more draws
        #      until B groups whose rewards differ, decided on the whole step's groups
        #      (pgzoo.adapters.lightning.sampling)
        #      asynchronously (rollout.max_staleness >= 1) the rows were sampled ahead, by an older version, and the
        #      engine now samples the next steps in the background while this step updates
        #      (pgzoo.adapters.lightning.pipeline)
        if self.pipeline is None:
            got, version = self.sample_step(step), step
        else:
            self._warn_shared_device()
            queued = self.pipeline.take(step)
            got, version = queued.sampled, queued.version
            self.pipeline.launch(step)
        ro, rewards = got.rollouts, got.rewards
        t1 = time.perf_counter()
        # 3. advantages over the whole step (every rank's rewards: batch-level estimators see the batch one process
        #    would), from the task rewards plus DAPO's overlong penalty when asked; lengths: OPO's baseline,
        #    REINFORCE++'s token weights
        lengths = ro.completion_mask.sum(-1)
        ob = self.ro.overlong_buffer
        penalty = None if ob is None else overlong_penalty(lengths, self.ro.max_new_tokens, ob.len, ob.penalty_factor)
        adv = step_advantages(self.advantage_name, rewards if penalty is None else rewards + penalty, lengths,
                              self.ro.group_size, width=ro.completion_mask.shape[1],
                              options=self.recipe.objective.advantage_options, strategy=self._strategy(),
                              device=self.device)
        # train.old_policy=sampling: rows sampled ahead bring π_θold (and R2's routes) computed under the weights
        # that sampled them (score_sampled_ahead, before those weights changed)
        #   (scores_ahead is asynchronous: the rows came from the pipeline's queue)
        scored = self.recipe.scores_ahead and queued.old_logprobs is not None
        routes = ro.routes if self.tr.routing_replay == "R3" else (
            queued.old_routes if scored and self.tr.routing_replay == "R2" else None)
        data = RolloutBatch.of(ro, adv, rewards, routes=routes,
                               old_logprobs=queued.old_logprobs if scored else None).to(self.device)
        if self.pipeline is not None:  # the policy version each row was sampled with
            data.versions = torch.full((len(rewards),), version, dtype=torch.long, device=self.device)
        if self.tr.mask_truncated_completions:  # DAPO's overlong filtering: truncated rows leave the loss
            data.loss_mask = loss_mask(data.completion_mask, data.truncated)
        if self.tr.routing_replay == "R3" and data.routes is None:
            raise RoutingError("routing_replay=R3 but the rollout engine returned no routes; use an engine with "
                               "supports_routes (rollout.engine=transformers on CPU) or R2")
        # 4-5. old logprobs (when needed; R2 records routes there) and the N mini-batch updates (R2/R3 replay)
        metrics = self.update(data, score_version=step if self.recipe.scores_ahead else None)
        t2 = time.perf_counter()
        # 6. sync: the updated weights into the rollout engine (asynchronously: once its generation in flight is
        #    done, and where it can, streamed in the background while the next step computes; the next optimizer
        #    step waits for it)
        generation_wait = 0.0
        if self.pipeline is not None:
            waited = time.perf_counter()
            self.pipeline.wait()
            generation_wait = time.perf_counter() - waited
        self.sync_engine(step, background=self.background_sync)
        if self.ro.verify_sync is not None:
            metrics.update(self._verify_sync(data, step))
        t3 = time.perf_counter()
        # 7. log: one row per global step
        metrics.update(self._rollout_metrics(data))
        if data.versions is not None:
            metrics.update(staleness_metrics(step, data.versions))
        metrics.update(got.metrics)
        metrics.update(shaping_metrics(None if penalty is None else penalty.to(self.device),
                                       data.truncated if self.tr.mask_truncated_completions else None,
                                       self._strategy()))
        tokens = metrics.pop("_tokens")
        metrics.update({"time/rollout": t1 - t0, "time/old_logprobs": metrics.pop("_t_old", 0.0),
                        "time/update": metrics.pop("_t_upd", t2 - t1), "time/sync": t3 - t2,
                        "time/sync_wait": metrics.pop("_t_sync_wait", 0.0),
                        "time/generation_wait": generation_wait + metrics.pop("_t_generation_wait", 0.0),
                        "time/step": t3 - t0, "throughput/tokens_per_s": tokens / max(t3 - t0, 1e-9)})
        self.log_row(step, metrics)
        check_step(self.history[-1], self.tr.stop_on, step, getattr(self.policy.config, "vocab_size", None))
        self.last_step = step
        bar = {"reward": metrics["reward/mean"], "len": metrics["response/length_mean"]}
        if self._trainer is not None:
            self.log_dict(bar, prog_bar=True, on_step=True, logger=False, batch_size=1, rank_zero_only=True)
        return None

    def sample_step(self, step: int):
        """Steps 1-2 of step ``step`` on this rank (:func:`pgzoo.adapters.lightning.sampling.sample_groups`): its
        rollouts, task rewards and dynamic-sampling metrics. Without dynamic sampling (always, asynchronously) no
        collective runs here, so the background thread may call it."""
        ds = self.ro.dynamic_sampling
        return sample_groups(self.task, lambda problems, seeds: self._draw(problems, step, seeds), step=step,
                             step_seed=self.step_seed(step), prompts=self.ro.prompts_per_step,
                             group_size=self.ro.group_size, max_draws=None if ds is None else ds.max_draws,
                             strategy=self._strategy(), device=self.device, pad_id=self._pad_id())

    def _warn_shared_device(self) -> None:
        """Once per run: background generation on the trainer's own GPU only queues behind the update's kernels."""
        if getattr(self, "_shared_device_warned", False):
            return
        self._shared_device_warned = True
        engine_device = getattr(self.engine, "device", None)
        index = lambda d: d.index if d.index is not None else torch.cuda.current_device()  # noqa: E731  "cuda" = current
        if (self.device.type == "cuda" and engine_device is not None and torch.device(engine_device).type == "cuda"
                and index(torch.device(engine_device)) == index(self.device)):
            import warnings

            warnings.warn(f"rollout.max_staleness={self.ro.max_staleness}: the rollout engine shares {self.device} "
                          "with the trainer, so generation and the update take turns on it and asynchronous RL gains "
                          "nothing; put the engine on a device of its own (rollout.device, e.g. cuda:1)",
                          stacklevel=2)

    def stop_rollouts(self) -> None:
        """End the background generation (asynchronous runs; a no-op otherwise): what is in flight is cancelled or
        finished, the thread ends. Call before closing the engine."""
        if self.pipeline is not None:
            self.pipeline.close()

    @property
    def background_sync(self) -> bool:
        """Whether step 6 streams the weights in the pipeline's background thread (asynchronous runs): the engine
        takes buckets, the policy is not sharded (a sharded gather is a collective: the trainer's thread) and no
        ``verify_sync`` compares the engine with the policy right after the sync."""
        return (self.pipeline is not None and hasattr(self.engine, "load_weight_buckets")
                and not is_sharded(self.policy) and self.ro.verify_sync is None)

    def sync_engine(self, step: int, background: bool = False) -> None:
        """Step 6: the policy's weights into this rank's rollout engine, in place: streamed parameter by parameter in
        buckets of ``rollout.sync_bucket_mb`` (:func:`pgzoo.rollout.sync.sync_weights`; a sharded policy is gathered
        one parameter at a time on every rank, never as a whole state dict). An engine with only the protocol's
        ``load_weights(model)`` gets the (unsharded) policy itself. ``background``: the checks run now (their errors
        raised here), the stream in the pipeline's thread (:meth:`RolloutPipeline.sync_in_background
        <pgzoo.adapters.lightning.pipeline.RolloutPipeline.sync_in_background>`); its errors surface when the next
        optimizer step waits for it."""
        try:
            if background:
                stream = prepare_sync(self.policy, self.engine, bucket_mb=self.ro.sync_bucket_mb)
                self.pipeline.sync_in_background(lambda: self._stream_sync(stream, step))
            elif hasattr(self.engine, "load_weight_buckets"):
                sync_weights(self.policy, self.engine, bucket_mb=self.ro.sync_bucket_mb)
            elif is_sharded(self.policy):
                raise EngineError(f"rollout engine {type(self.engine).__name__} has only load_weights(model); a sharded "
                                  "(train.strategy=fsdp) policy syncs through load_weight_buckets(buckets) "
                                  "(pgzoo.rollout.sync); use a pgzoo engine or add that method")
            else:
                self.engine.load_weights(self.policy)
        except PgzooError:
            raise
        except Exception as exc:
            raise self._load_failure(step, exc) from exc

    def _load_failure(self, step: int, exc: Exception) -> EngineError:
        """The error of a sync the engine failed (in the trainer's thread or the pipeline's), naming the step."""
        return EngineError(f"rollout engine {type(self.engine).__name__} failed to load the weights of step {step}: "
                           f"{type(exc).__name__}: {exc}")

    def _stream_sync(self, stream, step: int) -> None:
        """The background half of a sync (pipeline thread): the stream, then every kernel reading the parameters
        done, so the optimizer step that waits for it cannot overwrite a tensor still being sent. On CUDA the
        thread's current device is the rank's (a new thread's is device 0), for what the stream allocates or
        launches without naming a device (an NCCL transfer's stream)."""
        try:
            if self.device.type == "cuda":  # a thread starts on CUDA's device 0: make this rank's GPU current here too
                with torch.cuda.device(self.device):
                    stream()
                    torch.cuda.synchronize(self.device)
            else:
                stream()
        except PgzooError:
            raise
        except Exception as exc:
            raise self._load_failure(step, exc) from exc

    def _verify_sync(self, data: RolloutBatch, step: int) -> dict[str, float]:
        """Parity of the freshly synced engine with the policy on a probe: the step's first prompts (up to 4), 8
        tokens each at temperature 1. Raises EngineError above ``verify_sync`` (see pgzoo.rollout.sync_check)."""
        G = self.ro.group_size
        probe = [data.prompt_ids[i][data.prompt_mask[i]].tolist() for i in range(0, min(len(data.prompt_ids), 4 * G),
                                                                                   G)]
        try:
            with torch.no_grad():
                result = check_sync(self.engine, self.policy, probe, max_new_tokens=min(8, self.ro.max_new_tokens),
                                    seed=self.step_seed(step) + 1, tolerance=self.ro.verify_sync)
        except EngineError as exc:
            raise EngineError(f"step {step}: {exc}") from exc
        return {"sync/logprob_abs_diff_mean": result.mean_abs_diff, "sync/logprob_abs_diff_max": result.max_abs_diff}

    def step_seed(self, step: int) -> int:
        """The seed of step ``step`` (prompts and sampling): a function of the recipe seed and the step only, so a
        resumed run draws exactly what the uninterrupted run drew."""
        return (self.recipe.seed * 1_000_003 + step * 7_919) % (2**31 - 1)

    def prompt_seed(self, step: int, index: int) -> int:
        """The seed of prompt ``index`` of the step's B (completion j: + j): the same on whichever rank samples it, so
        W ranks draw the rows one process would. Hashed: seeds of other prompts and steps lie far apart."""
        return prompt_seed(self.step_seed(step), 0, index)

    def _pad_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return int(pad if pad is not None else getattr(self.tokenizer, "eos_token_id", None) or 0)

    def _draw(self, problems, step: int, seeds: list[int]):
        """One draw of steps 1-2: ``problems`` (this rank's) x G completions from the engine and their task rewards."""
        ro = self.rollout(problems, step, seeds=seeds)
        texts = self.tokenizer.batch_decode(strip_padding(ro.completion_ids, ro.completion_mask),
                                            skip_special_tokens=True)
        rewards = torch.tensor([self._reward(t, problems[i // self.ro.group_size], step)
                                for i, t in enumerate(texts)], dtype=torch.float32)
        return ro, rewards

    def rollout(self, problems, step: int, seeds: list[int]):
        enc = self.tokenizer([p.prompt for p in problems], add_special_tokens=False)
        prompts = [list(ids) for ids in enc["input_ids"]]
        try:
            return self.engine.generate(prompts, n=self.ro.group_size, max_new_tokens=self.ro.max_new_tokens,
                                        temperature=self.ro.temperature, top_p=self.ro.top_p,
                                        seed=seeds,
                                        return_routes=self.tr.routing_replay == "R3")
        except PgzooError:
            raise
        except Exception as exc:
            raise EngineError(f"rollout engine {type(self.engine).__name__} failed at step {step}: "
                              f"{type(exc).__name__}: {exc}") from exc

    def _reward(self, text: str, problem, step: int) -> float:
        try:
            value = float(self.task.reward(text, problem))
        except Exception as exc:
            raise PgzooError(f"the reward function of task {getattr(self.task, 'name', self.task)!r} raised "
                             f"{type(exc).__name__}: {exc} at step {step} on the sample prompt={problem.prompt!r} "
                             f"completion={text!r} answer={problem.answer!r}") from exc
        if not math.isfinite(value):
            raise PgzooError(f"the reward function of task {getattr(self.task, 'name', self.task)!r} returned "
                             f"{value} at step {step} on prompt={problem.prompt!r} completion={text!r}")
        return value

    # ------------------------------------------------------------------ updates
    def forward_logprobs(self, mb: RolloutBatch, trim: tuple[slice, slice] | None = None, policy=None):
        """Per-token logprobs/entropy ``[n, T]`` of a micro-batch's completions under ``policy`` (default: the
        policy). ``trim`` = (prompt columns, completion columns) to keep: all-padding columns dropped first (not
        under routing replay: stored routes cover the full padded positions); padding comes back as zeros."""
        model = self.policy if policy is None else policy
        n, T = mb.completion_ids.shape
        kw = dict(temperature=self.ro.temperature, chunk_size=self.tr.logprob_chunk_size,
                  with_entropy=policy is None)
        if trim is None:
            out = completion_logprobs(model, mb.prompt_ids, mb.prompt_mask, mb.completion_ids, mb.completion_mask,
                                      **kw)
            return out.logprobs, out.entropy
        ps, cs = trim
        out = completion_logprobs(model, mb.prompt_ids[:, ps], mb.prompt_mask[:, ps], mb.completion_ids[:, cs],
                                  mb.completion_mask[:, cs], **kw)
        if cs.stop == T:
            return out.logprobs, out.entropy
        pad = out.logprobs.new_zeros(n, T - cs.stop)  # on the logprobs' device and dtype
        ent = None if out.entropy is None else torch.cat([out.entropy, pad], 1)
        return torch.cat([out.logprobs, pad], 1), ent

    def _micro_slices(self, n: int) -> list[slice]:
        size = self.tr.micro_batch_size or n
        return [slice(i, min(i + size, n)) for i in range(0, n, size)]

    def _trim(self, lengths: Lengths, rows: slice, P: int) -> tuple[slice, slice] | None:
        return lengths.trim(rows, P) if self.replay.mode is None else None

    @torch.no_grad()
    def compute_old_logprobs(self, data: RolloutBatch, lengths: Lengths | None = None, replay=None) -> torch.Tensor:
        """π_θold of every row in the training engine, set as ``data.old_logprobs`` and returned; ``replay`` (default:
        the step's) records R2's routes in this pass or replays R3's rollout routes."""
        lengths = lengths or lengths_of(data)
        replay = self.replay if replay is None else replay
        olds = []
        for sl in self._micro_slices(data.prompt_ids.shape[0]):
            mb = data.rows(sl)
            with replay.old_pass(self.policy, rows=sl, mask=attention_of(mb)):
                lp, _ = self.forward_logprobs(mb, self._trim(lengths, sl, data.prompt_ids.shape[1]))
            olds.append(lp)
        data.old_logprobs = torch.cat(olds)
        return data.old_logprobs

    def update(self, data: RolloutBatch, score_version: int | None = None) -> dict[str, float]:
        """Steps 4-5: old logprobs when needed, then N optimizer steps over N contiguous mini-batches.

        ``data.old_logprobs`` already set (rows scored under the weights that sampled them) are used as they are,
        with R2 replaying ``data.routes`` recorded in that pass. ``score_version`` (``train.old_policy: sampling``):
        before the first optimizer step, while the policy still holds that version's weights, score the rows the
        engine sampled ahead with it (:meth:`score_sampled_ahead`).

        Normalisers of each mini-batch (sequences with >= 1 token, unmasked tokens) are summed over all ranks
        (through the strategy) before the first micro-batch, so Σ_ranks Σ_micro ∇loss_micro = ∇(loss of the whole
        mini-batch); DDP/FSDP average over ranks, hence the factor W in :meth:`_backward`.
        """
        t = self.tr
        opt, sched = self._opt_and_sched()
        t0 = time.perf_counter()
        self.policy.train()
        recorded = t.routing_replay == "R2" and data.old_logprobs is not None
        if recorded and data.routes is None:
            raise RoutingError("routing_replay=R2: these rows bring their π_θold but not the routes recorded with it")
        if recorded:
            self.replay.start_batch(recorded_routes=data.routes)
        else:
            self.replay.start_batch(data.routes)
        lengths = lengths_of(data)
        if self.needs_old_logprobs and data.old_logprobs is None:
            self.compute_old_logprobs(data, lengths)
        t1 = time.perf_counter()
        scoring = generation_wait = 0.0
        n_rows, P = data.prompt_ids.shape
        if n_rows % t.num_minibatches:
            raise PgzooError(f"num_minibatches={t.num_minibatches} does not divide the {n_rows} rows on this rank")
        mb_rows = n_rows // t.num_minibatches
        # the global normalisers of all N mini-batches in one reduction (host sync: one per step)
        mask = data.completion_mask if data.loss_mask is None else data.loss_mask  # train.mask_truncated_completions
        per_mb = mask.reshape(t.num_minibatches, mb_rows, -1)
        counts = torch.stack([per_mb.any(-1).sum(-1), per_mb.sum((-1, -2))], -1).float()
        counts = all_reduce_sum(counts, self._strategy()).clamp_min(1.0).tolist()
        acc = Accumulator(data.completion_mask.device)
        sync_wait = 0.0
        for n in range(t.num_minibatches):
            lo = n * mb_rows
            mini = data.rows(slice(lo, lo + mb_rows))
            num_seq, num_tok = counts[n]
            opt.zero_grad(set_to_none=True)
            for sl in self._micro_slices(mb_rows):
                mb = mini.rows(sl)
                rows = slice(lo + sl.start, lo + sl.stop)
                w = lengths.tokens(rows)
                with self.replay.update_pass(self.policy, rows=rows, mask=attention_of(mb)):
                    lp, ent = self.forward_logprobs(mb, self._trim(lengths, rows, P))
                    batch = TokenBatch(
                        logprobs=lp, mask=mb.completion_mask if mb.loss_mask is None else mb.loss_mask,
                        advantages=mb.advantages,
                        old_logprobs=mb.old_logprobs,
                        rollout_logprobs=mb.rollout_logprobs if self.ro.logprobs == "engine" else None,
                        ref_logprobs=self._ref_logprobs(mb, lengths, rows) if self.ref_policy is not None else None,
                        num_sequences=num_seq, num_tokens=num_tok, max_tokens=self.ro.max_new_tokens,
                        check_values=w > 0,
                        entropies=ent if "entropies" in self.objective.requires else None)
                    out = self.objective(batch)
                    self._backward(out.loss)  # inside the replay context: any recomputation replays too
                acc.add(out.metrics, w)
                acc.add({**entropy_metrics(ent, mb.completion_mask),
                         "loss": out.loss.detach() * num_tok / max(w, 1.0)}, w)
            params = [p for p in self.policy.parameters() if p.grad is not None]
            if t.grad_clip is not None:
                gn = torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
            else:
                gn = torch.nn.utils.get_total_norm([p.grad for p in params])
            acc.add({"grad_norm": unsharded(gn)}, 1.0)
            if self.pipeline is not None:  # the background sync still reads the parameters this step changes
                sync_wait += self.pipeline.wait_sync()
            if n == 0 and score_version is not None:  # the last moment the policy holds this version's weights
                started = time.perf_counter()
                self.pipeline.wait()  # the generation launched at this step's start (forward/backward overlapped it)
                scored = time.perf_counter()
                self.score_sampled_ahead(score_version)
                generation_wait, scoring = scored - started, time.perf_counter() - scored
            opt.step()
            sched.step()
        t2 = time.perf_counter()
        self.policy.eval()
        metrics = acc.result(self._strategy())  # host sync: the step's metrics, over all ranks
        metrics["lr"] = float(sched.get_last_lr()[0])
        metrics.update({k: float(v) for k, v in self.replay.metrics().items()})
        if t.routing_replay is not None and metrics.get("routing/layers_hit", 0.0) <= 0:
            raise RoutingError(f"routing replay {t.routing_replay} was asked for but forced no MoE layer this step")
        # the scoring pass is an old-logprob pass; the wait before it is the generation's
        metrics["_t_old"], metrics["_t_upd"] = t1 - t0 + scoring, t2 - t1 - scoring - generation_wait
        metrics["_t_sync_wait"], metrics["_t_generation_wait"] = sync_wait, generation_wait
        return metrics

    @torch.no_grad()
    def score_sampled_ahead(self, version: int) -> None:
        """``train.old_policy: sampling``: π_θold of every row the engine sampled ahead with ``version``, in the
        training engine under that version's weights, which the policy holds until the first optimizer step of step
        ``version`` (the caller's moment); R2 records the routes of this pass with them and R3 replays the engine's.
        Waits for the generations in flight: the step's forward and backward overlapped them, the optimizer step
        does not. On every rank at the same point, in the main thread (a sharded forward is a collective)."""
        from pgzoo.routing import RoutingReplay

        for queued in self.pipeline.sampled_by(version):
            if queued.old_logprobs is not None:
                continue
            ro = queued.sampled.rollouts
            # the advantages are computed when the step trains (over every rank's rewards); this pass reads the
            # ids and masks only
            rows = RolloutBatch.of(ro, torch.zeros(ro.completion_ids.shape[0]), queued.sampled.rewards,
                                   routes=ro.routes if self.tr.routing_replay == "R3" else None).to(self.device)
            replay = RoutingReplay(self.tr.routing_replay)  # this pass's own: the step's replay holds its batch
            replay.start_batch(rows.routes)
            queued.old_logprobs = self.compute_old_logprobs(rows, replay=replay).cpu()
            if replay.mode == "R2":
                queued.old_routes = replay.routes.cpu()

    @torch.no_grad()
    def _ref_logprobs(self, mb: RolloutBatch, lengths: Lengths, rows: slice) -> torch.Tensor:
        lp, _ = self.forward_logprobs(mb, lengths.trim(rows, mb.prompt_ids.shape[1]), policy=self.ref_policy)
        return lp

    # ------------------------------------------------------------------ logging
    def _rollout_metrics(self, data: RolloutBatch) -> dict[str, float]:
        stats = torch.stack([data.rewards.sum(), (data.rewards > 0).float().sum(),
                             data.completion_mask.sum(-1).float().sum(), data.truncated.float().sum(),
                             torch.tensor(float(data.rewards.numel()), device=data.rewards.device)])
        s = all_reduce_sum(stats.clone(), self._strategy()).tolist()
        n = max(s[4], 1.0)
        return {"reward/mean": s[0] / n, "reward/accuracy": s[1] / n, "response/length_mean": s[2] / n,
                "response/truncated_frac": s[3] / n, "_tokens": s[2]}

    def log_row(self, step: int, metrics: dict[str, float]) -> None:
        row = {k: float(v) for k, v in metrics.items() if not k.startswith("_")}
        self.history.append({"step": step, **row})
        if self._trainer is not None and world()[1] == 0:
            for logger in self.loggers:
                logger.log_metrics(row, step=step)


__all__ = ["RLModule"]
