"""A GRPO-style RL loop as a LightningModule (manual optimisation): the paper's synchronous loop, one screen long.

Runbook. Each global step (one ``training_step``):

    1. rollout      B prompts x G completions from the rollout engine (vLLM or transformers), with μ logprobs
    2. rewards      the task's verifiable reward per completion
    3. advantages   the objective's default estimator (or the recipe's), group-relative over the G completions
    4. old logprobs π_θold in the training engine, only off-policy (N > 1) or for R2 (routes recorded there)
    5. updates      N mini-batches, one optimizer step each, R2/R3 routes replayed; normalisers are GLOBAL
                    (every rank and micro-batch of the mini-batch), so DDP and accumulation give the
                    single-process gradient
    6. sync         the new weights into the rollout engine, in place
    7. log          one metrics row per step (Lightning loggers); checkpoints by :class:`HFCheckpoint`

    module = RLModule(policy, tokenizer, pgzoo.get("minirl"), pgzoo.tasks.get("arithmetic"), engine, LoopConfig())
    trainer = lightning.Trainer(max_epochs=1, ..., callbacks=[HFCheckpoint(run_dir, every=10)])
    trainer.fit(module, train_dataloaders=step_loader(start=0, steps=40))

``pgzoo train RECIPE`` (pgzoo/train.py) builds all of this from a recipe. Without a Lightning trainer attached the
same :meth:`RLModule.update` runs stand-alone (the DDP test drives it from two gloo processes).
"""

from __future__ import annotations

import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from pgzoo import advantages as _advantages
from pgzoo.batch import TokenBatch
from pgzoo.diagnostics import entropy_metrics
from pgzoo.errors import EngineError, PgzooError, RoutingError, require
from pgzoo.fileio import atomic_folder
from pgzoo.logprobs import completion_logprobs
from pgzoo.rollout.sync_check import check_sync

L = require("lightning", "lightning")


@dataclass
class LoopConfig:
    """The loop's knobs (a recipe's rollout/train sections, flattened; see pgzoo.recipes for each one)."""

    prompts_per_step: int = 16
    group_size: int = 8
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    num_minibatches: int = 1
    micro_batch_size: int | None = None
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = 1.0
    warmup_steps: int = 0
    routing_replay: str | None = None
    logprob_chunk_size: int | None = None
    advantage: str | None = None
    use_rollout_logprobs: bool = True
    seed: int = 0
    verify_sync: float | None = None  # after each sync: tolerance of the engine-vs-policy logprob parity probe

    @property
    def needs_old_logprobs(self) -> bool:
        return self.num_minibatches > 1 or self.routing_replay == "R2"


@dataclass
class RolloutBatch:
    """One step's data on this rank, rows prompt-major (the G rows of a prompt contiguous)."""

    prompt_ids: torch.Tensor        # [n, P] left-padded
    prompt_mask: torch.Tensor       # [n, P]
    completion_ids: torch.Tensor    # [n, T] right-padded
    completion_mask: torch.Tensor   # [n, T] bool
    rollout_logprobs: torch.Tensor  # [n, T] μ (0 at padding)
    advantages: torch.Tensor        # [n]
    rewards: torch.Tensor           # [n]
    truncated: torch.Tensor         # [n] bool
    routes: torch.Tensor | None = None      # [n, P+T, L, k] routes to replay (R3: rollout's; R2: θold's)
    old_logprobs: torch.Tensor | None = None  # [n, T] π_θold (training engine)

    def rows(self, idx: slice) -> "RolloutBatch":
        pick = lambda x: None if x is None else x[idx]  # noqa: E731
        return RolloutBatch(**{k: pick(v) for k, v in self.__dict__.items()})


def _dist():
    d = torch.distributed
    return (d.get_world_size(), d.get_rank()) if d.is_available() and d.is_initialized() else (1, 0)


def _all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if _dist()[0] > 1:
        torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.SUM)
    return x


def _trim(mb: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, slice, slice]:
    """Drop all-padding prompt columns (left) and completion columns (right) of a micro-batch: less compute, same
    values (left padding is masked and positions are counted from the first real token)."""
    P = mb.prompt_ids.shape[1]
    first = int((mb.prompt_mask.long().sum(0) > 0).nonzero()[0]) if mb.prompt_mask.any() else 0
    last = int(mb.completion_mask.long().sum(-1).max().clamp_min(1))
    ps, cs = slice(first, P), slice(0, last)
    return (mb.prompt_ids[:, ps], mb.prompt_mask[:, ps], mb.completion_ids[:, cs], mb.completion_mask[:, cs], ps, cs)


class RLModule(L.LightningModule):
    """Policy-gradient RL on a Hugging Face causal LM with a pgzoo objective (see the module docstring)."""

    def __init__(self, policy, tokenizer, objective, task, engine, config: LoopConfig | None = None,
                 ref_policy=None):
        super().__init__()
        self.policy = policy
        self.tokenizer = tokenizer
        self.objective = objective
        self.task = task
        self.engine = engine
        self.cfg = config or LoopConfig()
        self.ref_policy = ref_policy
        self.automatic_optimization = False
        self.advantage_name = self.cfg.advantage or objective.default_advantage
        self.history: list[dict[str, float]] = []  # one metrics row per step (also sent to the loggers)
        self.last_step = -1
        from pgzoo.routing import RoutingReplay

        self.replay = RoutingReplay(self.cfg.routing_replay)

    # ------------------------------------------------------------------ optimisation setup
    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.policy.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay,
                                betas=tuple(self.cfg.betas))
        warm = self.cfg.warmup_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
        return [opt], [sched]

    def _opt_and_sched(self):
        if self._trainer is not None:
            opt, sched = self.optimizers(), self.lr_schedulers()
            return opt, sched
        if not hasattr(self, "_standalone"):
            (opt,), (sched,) = self.configure_optimizers()
            self._standalone = (opt, sched)
        return self._standalone

    def _backward(self, loss: torch.Tensor) -> None:
        if self._trainer is not None:
            self.manual_backward(loss)
        else:
            loss.backward()

    def _verify_sync(self, data: RolloutBatch, step: int) -> dict[str, float]:
        """Parity of the freshly synced engine with the policy on a probe: the step's first prompts (up to 4), 8
        tokens each at temperature 1. Raises EngineError above ``verify_sync`` (see pgzoo.rollout.sync_check)."""
        rows = range(0, min(len(data.prompt_ids), 4 * self.cfg.group_size), self.cfg.group_size)
        probe = [data.prompt_ids[i][data.prompt_mask[i]].tolist() for i in rows]
        try:
            result = check_sync(self.engine, self.policy, probe, max_new_tokens=min(8, self.cfg.max_new_tokens),
                                seed=self.step_seed(step) + 1, tolerance=self.cfg.verify_sync)
        except EngineError as exc:
            raise EngineError(f"step {step}: {exc}") from exc
        return {"sync/logprob_abs_diff_mean": result.mean_abs_diff, "sync/logprob_abs_diff_max": result.max_abs_diff}

    # ------------------------------------------------------------------ the loop
    def training_step(self, batch, batch_idx):
        step = int(batch)
        world, rank = _dist()
        t0 = time.perf_counter()
        # 1. rollout: this rank's share of the B prompts, G completions each (host sync: the engine returns CPU ids)
        problems = self.task.sample(self.cfg.prompts_per_step, split="train", seed=self.step_seed(step))
        problems = problems[rank::world]
        ro = self.rollout(problems, step)
        t1 = time.perf_counter()
        # 2. rewards: the task's verifiable reward of each decoded completion
        texts = self.tokenizer.batch_decode(_strip(ro.completion_ids, ro.completion_mask), skip_special_tokens=True)
        rewards = torch.tensor([self._reward(t, problems[i // self.cfg.group_size], step)
                                for i, t in enumerate(texts)], dtype=torch.float32)
        # 3. advantages: group-relative (groups never straddle ranks: prompts are sharded whole)
        adv = _advantages.compute(self.advantage_name, rewards, group_size=self.cfg.group_size,
                                  lengths=ro.completion_mask.sum(-1))  # OPO's baseline, REINFORCE++'s token weights
        data = RolloutBatch(ro.prompt_ids, ro.prompt_mask.bool(), ro.completion_ids, ro.completion_mask.bool(),
                            ro.logprobs.float(), adv, rewards, ro.truncated.bool(),
                            routes=ro.routes if self.cfg.routing_replay == "R3" else None)
        if self.cfg.routing_replay == "R3" and data.routes is None:
            raise RoutingError("routing_replay=R3 but the rollout engine returned no routes; use an engine with "
                               "supports_routes (rollout.engine=transformers on CPU) or R2")
        # 4-5. old logprobs (when needed; R2 records routes there) and the N mini-batch updates (R2/R3 replay)
        metrics = self.update(data)
        t2 = time.perf_counter()
        # 6. sync: the updated weights into the rollout engine, in place
        try:
            self.engine.load_weights(self.policy)
        except PgzooError:
            raise
        except Exception as exc:
            raise EngineError(f"rollout engine {type(self.engine).__name__} failed to load the weights of step "
                              f"{step}: {type(exc).__name__}: {exc}") from exc
        if self.cfg.verify_sync is not None:
            metrics.update(self._verify_sync(data, step))
        t3 = time.perf_counter()
        # 7. log: one row per global step
        tokens = int(_all_reduce_sum(data.completion_mask.sum().float().clone()).item())
        metrics.update(self._rollout_metrics(data))
        metrics.update({"time/rollout": t1 - t0, "time/old_logprobs": metrics.pop("_t_old", 0.0),
                        "time/update": metrics.pop("_t_upd", t2 - t1), "time/sync": t3 - t2,
                        "time/step": t3 - t0, "throughput/tokens_per_s": tokens / max(t3 - t0, 1e-9)})
        self.log_row(step, metrics)
        self.last_step = step
        bar = {"reward": metrics["reward/mean"], "len": metrics["response/length_mean"]}
        if self._trainer is not None:
            self.log_dict(bar, prog_bar=True, on_step=True, logger=False, batch_size=1)
        return None

    def step_seed(self, step: int) -> int:
        """The seed of step ``step`` (prompts and sampling): a function of the recipe seed and the step only, so a
        resumed run draws exactly what the uninterrupted run drew."""
        return (self.cfg.seed * 1_000_003 + step * 7_919) % (2**31 - 1)

    def rollout(self, problems, step: int):
        enc = self.tokenizer([p.prompt for p in problems], add_special_tokens=False)
        prompts = [list(ids) for ids in enc["input_ids"]]
        try:
            return self.engine.generate(prompts, n=self.cfg.group_size, max_new_tokens=self.cfg.max_new_tokens,
                                        temperature=self.cfg.temperature, top_p=self.cfg.top_p,
                                        seed=self.step_seed(step) + _dist()[1],
                                        return_routes=self.cfg.routing_replay == "R3")
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
    def forward_logprobs(self, mb: RolloutBatch, trim: bool = True):
        """Per-token logprobs/entropy ``[n, T]`` of a micro-batch's completions under the policy. ``trim`` drops
        all-padding columns first (not under routing replay: stored routes cover the full padded positions)."""
        n, T = mb.completion_ids.shape
        kw = dict(temperature=self.cfg.temperature, chunk_size=self.cfg.logprob_chunk_size)
        if not trim:
            out = completion_logprobs(self.policy, mb.prompt_ids, mb.prompt_mask, mb.completion_ids,
                                      mb.completion_mask, **kw)
            return out.logprobs, out.entropy
        pid, pm, cid, cm, ps, cs = _trim(mb)
        out = completion_logprobs(self.policy, pid, pm, cid, cm, **kw)
        if cs.stop == T:
            return out.logprobs, out.entropy
        pad = torch.zeros(n, T - cs.stop, dtype=out.logprobs.dtype)
        return torch.cat([out.logprobs, pad], 1), torch.cat([out.entropy, pad], 1)

    def _micro_slices(self, n: int) -> list[slice]:
        size = self.cfg.micro_batch_size or n
        return [slice(i, min(i + size, n)) for i in range(0, n, size)]

    @torch.no_grad()
    def compute_old_logprobs(self, data: RolloutBatch) -> None:
        """π_θold of every row in the training engine (R2: routes recorded here; R3: rollout routes replayed)."""
        olds = []
        for sl in self._micro_slices(data.prompt_ids.shape[0]):
            mb = data.rows(sl)
            with self.replay.old_pass(self.policy, rows=sl, mask=_attention(mb)):
                lp, _ = self.forward_logprobs(mb, trim=self.replay.mode is None)
            olds.append(lp)
        data.old_logprobs = torch.cat(olds)

    def update(self, data: RolloutBatch) -> dict[str, float]:
        """Steps 4-5: old logprobs when needed, then N optimizer steps over N contiguous mini-batches.

        Normalisers of each mini-batch (sequences with >= 1 token, unmasked tokens) are summed over all ranks
        before the first micro-batch, so Σ_ranks Σ_micro ∇loss_micro = ∇(loss of the whole mini-batch).
        """
        cfg = self.cfg
        opt, sched = self._opt_and_sched()
        t0 = time.perf_counter()
        self.policy.train()
        self.replay.start_batch(data.routes)
        if cfg.needs_old_logprobs:
            self.compute_old_logprobs(data)
        t1 = time.perf_counter()
        n_rows = data.prompt_ids.shape[0]
        if n_rows % cfg.num_minibatches:
            raise PgzooError(f"num_minibatches={cfg.num_minibatches} does not divide the {n_rows} rows on this rank")
        mb_rows = n_rows // cfg.num_minibatches
        sums: dict[str, float] = {}
        weights: dict[str, float] = {}
        for n in range(cfg.num_minibatches):
            lo = n * mb_rows
            mini = data.rows(slice(lo, lo + mb_rows))
            counts = torch.stack([mini.completion_mask.any(-1).sum(), mini.completion_mask.sum()]).float()
            counts = _all_reduce_sum(counts)  # host sync below: the global normalisers of this mini-batch
            num_seq, num_tok = max(float(counts[0]), 1.0), max(float(counts[1]), 1.0)
            opt.zero_grad(set_to_none=True)
            for sl in self._micro_slices(mb_rows):
                mb = mini.rows(sl)
                rows = slice(lo + sl.start, lo + sl.stop)
                with self.replay.update_pass(self.policy, rows=rows, mask=_attention(mb)):
                    lp, ent = self.forward_logprobs(mb, trim=self.replay.mode is None)
                    batch = TokenBatch(
                        logprobs=lp, mask=mb.completion_mask, advantages=mb.advantages,
                        old_logprobs=mb.old_logprobs,
                        rollout_logprobs=mb.rollout_logprobs if cfg.use_rollout_logprobs else None,
                        ref_logprobs=self._ref_logprobs(mb) if self.ref_policy is not None else None,
                        num_sequences=num_seq, num_tokens=num_tok, max_tokens=cfg.max_new_tokens,
                        check_values=bool(mb.completion_mask.any()),
                        entropies=ent if "entropies" in self.objective.requires else None)
                    out = self.objective(batch)
                    self._backward(out.loss)  # inside the replay context: any recomputation replays too
                w = float(mb.completion_mask.sum())
                _accumulate(sums, weights, out.metrics, w)
                _accumulate(sums, weights, {**entropy_metrics(ent, mb.completion_mask),
                                            "loss": out.loss.detach() * num_tok / max(w, 1.0)}, w)
            self._sync_grads()
            if cfg.grad_clip is not None:
                gn = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.grad_clip)
            else:
                gn = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in self.policy.parameters()
                                    if p.grad is not None))
            sums["grad_norm"] = sums.get("grad_norm", 0.0) + float(gn)
            weights["grad_norm"] = weights.get("grad_norm", 0.0) + 1.0
            opt.step()
            sched.step()
        t2 = time.perf_counter()
        self.policy.eval()
        metrics = {k: sums[k] / max(weights[k], 1e-12) for k in sums}
        metrics["lr"] = float(sched.get_last_lr()[0])
        metrics.update({k: float(v) for k, v in self.replay.metrics().items()})
        if cfg.routing_replay is not None and metrics.get("routing/layers_hit", 0.0) <= 0:
            raise RoutingError(f"routing replay {cfg.routing_replay} was asked for but forced no MoE layer this step")
        metrics["_t_old"], metrics["_t_upd"] = t1 - t0, t2 - t1
        return metrics

    def _sync_grads(self) -> None:
        """Sum gradients over ranks (normalisers are global, so the sum is the single-process gradient)."""
        world, _ = _dist()
        if world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.policy.parameters()]
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        offset = 0
        for p, g in zip(self.policy.parameters(), grads):
            k = g.numel()
            p.grad = flat[offset:offset + k].view_as(p).clone()
            offset += k

    @torch.no_grad()
    def _ref_logprobs(self, mb: RolloutBatch) -> torch.Tensor:
        pid, pm, cid, cm, ps, cs = _trim(mb)
        out = completion_logprobs(self.ref_policy, pid, pm, cid, cm, temperature=self.cfg.temperature,
                                  chunk_size=self.cfg.logprob_chunk_size, with_entropy=False)
        T = mb.completion_ids.shape[1]
        return torch.cat([out.logprobs, torch.zeros(out.logprobs.shape[0], T - cs.stop)], 1)

    # ------------------------------------------------------------------ logging
    def _rollout_metrics(self, data: RolloutBatch) -> dict[str, float]:
        stats = torch.stack([data.rewards.sum(), (data.rewards > 0).float().sum(),
                             data.completion_mask.sum(-1).float().sum(), data.truncated.float().sum(),
                             torch.tensor(float(data.rewards.numel()))])
        stats = _all_reduce_sum(stats.clone())
        s = stats.tolist()
        n = max(s[4], 1.0)
        return {"reward/mean": s[0] / n, "reward/accuracy": s[1] / n, "response/length_mean": s[2] / n,
                "response/truncated_frac": s[3] / n}

    def log_row(self, step: int, metrics: dict[str, float]) -> None:
        row = {k: float(v) for k, v in metrics.items() if not k.startswith("_")}
        self.history.append({"step": step, **row})
        if self._trainer is not None and _dist()[1] == 0:
            for logger in self.loggers:
                logger.log_metrics(row, step=step)


def _attention(mb: RolloutBatch) -> torch.Tensor:
    return torch.cat([mb.prompt_mask, mb.completion_mask], 1)


def _strip(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    return [row[m].tolist() for row, m in zip(ids, mask.bool())]


def _accumulate(sums: dict, weights: dict, metrics: dict, w: float) -> None:
    """Token-weighted mean over micro-batches (max/min kept as max/min)."""
    for k, v in metrics.items():
        v = float(v.detach().float().mean()) if isinstance(v, torch.Tensor) else float(v)
        if not math.isfinite(v):
            continue
        if k.endswith(("max", "/max")) or "_max" in k:
            sums[k] = max(sums.get(k, -math.inf), v)
            weights[k] = 1.0
        elif k.endswith(("min", "/min")) or "_min" in k:
            sums[k] = min(sums.get(k, math.inf), v)
            weights[k] = 1.0
        else:
            sums[k] = sums.get(k, 0.0) + v * w
            weights[k] = weights.get(k, 0.0) + w


# ---------------------------------------------------------------------- data, checkpoints, callbacks
class StepDataset(torch.utils.data.Dataset):
    """The global step indices ``start .. steps-1``: each item is one training_step (prompts are drawn from the
    task inside the step with a per-step seed, so resuming at any step reproduces the same prompts)."""

    def __init__(self, start: int, steps: int):
        self.start, self.steps = start, steps

    def __len__(self) -> int:
        return max(self.steps - self.start, 0)

    def __getitem__(self, i: int) -> int:
        return self.start + i


def step_loader(start: int, steps: int):
    return torch.utils.data.DataLoader(StepDataset(start, steps), batch_size=None, shuffle=False,
                                       collate_fn=lambda x: x)


STATE_FILE = "trainer_state.pt"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover
        pass
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def save_checkpoint(module: RLModule, path: Path, step: int, extra: dict | None = None) -> Path:
    """Write an HF checkpoint + trainer state to ``path`` atomically (temp folder, then rename)."""
    path = Path(path)
    with atomic_folder(path) as tmp:
        gen = getattr(module.policy, "generation_config", None)
        if gen is not None and getattr(gen, "top_k", None) == 0 and not gen.do_sample:
            gen.do_sample = True  # a pure-temperature sampling config (top_k=0) must say it samples to validate
        module.policy.save_pretrained(tmp, safe_serialization=True)
        module.tokenizer.save_pretrained(tmp)
        opt, sched = module._opt_and_sched()
        opt = getattr(opt, "optimizer", opt)
        torch.save({"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "rng": rng_state(), "config": asdict(module.cfg), "history": module.history,
                    **(extra or {})}, tmp / STATE_FILE)
    return path


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete step checkpoint in ``run_dir/checkpoints`` (None if there is none)."""
    ckpts = sorted(p for p in (Path(run_dir) / "checkpoints").glob("step-*") if (p / STATE_FILE).is_file())
    return ckpts[-1] if ckpts else None


def checkpoint_step(ckpt: Path) -> int:
    """The last completed global step stored in ``ckpt``."""
    return int(torch.load(Path(ckpt) / STATE_FILE, weights_only=False)["step"])


def load_trainer_state(module: RLModule, ckpt: Path) -> int:
    """Restore optimizer, scheduler, RNG and history from ``ckpt``; returns the next step to run."""
    state = torch.load(Path(ckpt) / STATE_FILE, weights_only=False)
    opt, sched = module._opt_and_sched()
    getattr(opt, "optimizer", opt).load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    module.history = list(state.get("history", []))
    module.last_step = state["step"]
    return state["step"] + 1


class HFCheckpoint(L.Callback):
    """Save ``run_dir/checkpoints/step-XXXXXX`` (HF model + tokenizer + trainer state) every ``every`` steps and at
    the end; keep the newest ``keep``. Writes are atomic, so an interrupted save leaves the last one intact."""

    def __init__(self, run_dir: Path, every: int = 10, keep: int = 2, total_steps: int | None = None,
                 on_save=None):
        self.dir = Path(run_dir) / "checkpoints"
        self.every, self.keep, self.total_steps, self.on_save = every, keep, total_steps, on_save
        self._pending: dict | None = None

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = int(batch)
        last = self.total_steps is not None and step == self.total_steps - 1
        if (self.every and (step + 1) % self.every == 0) or last:
            self.save(module, step)

    def save(self, module: RLModule, step: int) -> Path | None:
        if _dist()[1] != 0:
            return None
        path = save_checkpoint(module, self.dir / f"step-{step + 1:06d}", step)
        for old in sorted(p for p in self.dir.glob("step-*") if p != path)[:-max(self.keep - 1, 0) or None]:
            shutil.rmtree(old, ignore_errors=True)
        if self.on_save is not None:
            self.on_save(path, step)
        return path


__all__ = ["RLModule", "LoopConfig", "RolloutBatch", "HFCheckpoint", "StepDataset", "step_loader",
           "save_checkpoint", "latest_checkpoint", "load_trainer_state", "checkpoint_step"]
