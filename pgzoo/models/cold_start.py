"""Cold start: supervised fine-tuning of the embedded tiny MoE on a task until it is good, but not too good.

    from pgzoo.models.cold_start import ensure_cold_start
    path = ensure_cold_start("arithmetic", {}, seed=0)          # cached; seconds when already built
    model, tok = pgzoo.models.load_pretrained(path)

    pgzoo cold-start [--task arithmetic] [--task-option max_digits=2] [--seed 0] [--cache-dir DIR] [--force]

Runbook (what :func:`cold_start` does, top to bottom):

1. build the task, the character tokenizer and a fresh tiny Qwen3-MoE (``pgzoo.models.build_tiny_moe``, seeded);
2. each step: sample ``batch_size`` train-split problems, train on ``prompt + target + EOS`` with the
   cross-entropy on the target and EOS tokens only (the target is ``task.demonstration(problem)``: the answer, or
   a worked solution such as ``scratchpad``'s column lines) (AdamW, linear warm-up, constant learning rate);
3. every ``eval_every`` steps (every step once the rule's sampled mean passes ``target / 2``, as the rise is steep):
   the exact teacher-forced sampled (T = 1) and greedy accuracies (:func:`teacher_forced_accuracy`, one forward
   pass, no sampling noise) on ``eval_n`` *train-split* problems drawn with a separate seed; stop at the first check
   where the mean of the last ``window`` checks has avg@1 >= ``target`` or greedy accuracy > ``greedy_max`` (or at
   ``max_steps``, or ``max_seconds`` when set), and keep the weights of the median of those checks (by the measure
   that fired);
4. measure held-out accuracy on ``final_eval_n`` test-split problems (greedy and avg@1 at T = 1), then write the
   checkpoint, tokenizer and ``card.json`` atomically (temporary folder, then move).

Why a mean over ``window`` checks: at the SFT learning rate one check's accuracy swings by several points between
consecutive steps (greedy 0.29 -> 0.36 -> 0.24 near the rise), so a rule on one check fires on whichever upward
swing first crosses the threshold, and another CPU (another float summation order) swings differently. The mean of 5
consecutive checks rises with the model, not with its swings, and the median check's weights neither overshoot a
steep rise (the newest check can sit 10 points above the mean) nor sit on a swing. The rule aims low in the band so
that RL has room: mean avg@1 >= 0.33 or mean greedy accuracy > 0.50 (the band of held-out avg@1 is [0.20, 0.60]: a
start that fires on greedy can hold 0.25, and RL from such starts gained 26 and 31 points in 100 steps).
``card.json`` records the task and options, seed, steps, the step whose weights were kept (``selected_step``),
seconds, the train-split accuracies of that check (and the rule's means in ``history``), the held-out accuracies and
whether the run landed in the band (``in_band``: held-out avg@1 within ``band``).

Caching: the checkpoint lives in ``<cache_dir>/cold-start/<task>-<key>``, ``key`` a sha256 of everything that
affects the result (task name and resolved options, seed, resolved SFT options, model config, pgzoo/torch/transformers
versions). ``cache_dir`` defaults to ``$PGZOO_CACHE`` or ``~/.cache/pgzoo``. Concurrent callers serialise on a lock
file, so two processes never train the same checkpoint twice.

Which cold start a recipe trains from (``model.cold_start.seed``, :func:`recipe_cold_start`): one per recipe, seed
0 by default, whatever the run's ``seed`` — the run's seed seeds the RL (rollouts, data order, dropout), and the
cold start plays the base model, which every seed of an experiment shares as the paper's runs share one checkpoint;
``seed: run`` gives each run seed its own cold start (the starting model then varies with the RL seed).

Determinism: the same seed gives the same weights on the same machine and thread count (torch CPU kernels are
deterministic for a fixed thread count; a different thread count may change float summation order).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from pgzoo.errors import ConfigError, require
from pgzoo.version import __version__

COLD_START_VERSION = 2
COLD_START_SEED = 0  # the cold start every run seed shares unless model.cold_start.seed says otherwise
PER_RUN_SEED = "run"  # model.cold_start.seed: run -> the run's own seed (a cold start per seed)


def check_cold_start_seed(value: Any) -> int | str:
    """A recipe's ``model.cold_start.seed``: an integer >= 0, or ``run`` (the run's seed)."""
    if value == PER_RUN_SEED or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    raise ConfigError(f"model.cold_start.seed={value!r}; use an integer >= 0 (one cold start shared by every run "
                      f"seed) or {PER_RUN_SEED!r} (each run seed its own cold start)")


def recipe_cold_start(options: dict[str, Any], run_seed: int) -> tuple[int, dict[str, Any]]:
    """``(cold-start seed, SFT options)`` of a recipe's ``model.cold_start`` for a run seeded ``run_seed``: the
    ``seed`` key (default :data:`COLD_START_SEED`; ``run``: ``run_seed``) split from the options of
    :func:`ensure_cold_start`. The cache key holds the cold-start seed, so runs that share it share one checkpoint."""
    sft = dict(options)
    seed = check_cold_start_seed(sft.pop("seed", COLD_START_SEED))
    return (run_seed if seed == PER_RUN_SEED else seed), sft


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """Cold-start SFT settings (all keyword overrides of :func:`ensure_cold_start`)."""

    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup_steps: int = 20
    max_steps: int = 3000
    max_seconds: float | None = None  # optional wall-clock cap (breaks determinism when it triggers)
    eval_every: int = 5
    eval_n: int = 512
    final_eval_n: int = 500
    target: float = 0.33          # the rule fires once the mean sampled (T=1) accuracy of `window` checks reaches
    greedy_max: float = 0.50      # this, or their mean greedy accuracy exceeds this
    window: int = 5               # checks averaged by the rule (every step once near): no single lucky step fires it
    band: tuple[float, float] = (0.20, 0.60)
    max_new_tokens: int = 8
    threads: int = 1              # torch CPU threads during SFT (1: fast on a shared machine, deterministic)
    # overrides of tiny_moe_config, or the name of a shape in pgzoo.models.tiny.TINY_MOE_SHAPES ("routed-32x4")
    model: dict[str, Any] | str = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in ("batch_size", "max_steps", "eval_every", "eval_n", "final_eval_n", "max_new_tokens",
                    "threads", "window"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"cold start: {key}={v!r}; use a positive integer")
        if not self.lr > 0:
            raise ConfigError(f"cold start: lr={self.lr!r}; use a positive learning rate")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ConfigError(f"cold start: max_seconds={self.max_seconds!r}; use a positive time budget")
        lo, hi = self.band
        if not 0 <= lo < hi <= 1:
            raise ConfigError(f"cold start: band={self.band!r}; use (low, high) with 0 <= low < high <= 1")
        if not 0 < self.target <= 1 or not 0 < self.greedy_max <= 1:
            raise ConfigError(f"cold start: target={self.target!r}, greedy_max={self.greedy_max!r}; use values in "
                              "(0, 1]")
        if not isinstance(self.model, (dict, str)):
            raise ConfigError(f"cold start: model={self.model!r}; pass a dict of tiny_moe_config overrides or a "
                              "shape name such as 'routed-32x4'")
        if isinstance(self.model, str):
            from pgzoo.models.tiny import moe_shape

            moe_shape(self.model)  # an unknown name fails here, naming the valid ones

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> SFTConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - fields)
        if unknown:
            raise ConfigError(f"cold start: unknown option(s) {', '.join(unknown)}; valid: {', '.join(sorted(fields))}")
        opts = dict(options)
        if "band" in opts:
            opts["band"] = tuple(opts["band"])
        return cls(**opts)


def default_cache_dir() -> Path:
    """``$PGZOO_CACHE`` or ``~/.cache/pgzoo``."""
    return Path(os.environ.get("PGZOO_CACHE") or Path.home() / ".cache" / "pgzoo")


def cache_key(task_name: str, task_options: dict[str, Any], seed: int, config: SFTConfig) -> str:
    """sha256 (16 hex digits) of everything that affects the cold-start result (``task_options``: the task's
    :meth:`~pgzoo.tasks.Task.fingerprint`, which adds a content hash for file-backed tasks)."""
    import torch
    import transformers

    from pgzoo.models.tiny import moe_shape, tiny_moe_config

    payload = {
        "version": COLD_START_VERSION,
        "pgzoo": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "task": task_name,
        "task_options": task_options,
        "seed": seed,
        "sft": dataclasses.asdict(config),
        "model": tiny_moe_config(**moe_shape(config.model)).to_dict(),
    }
    for k in ("transformers_version", "_name_or_path"):
        payload["model"].pop(k, None)
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@contextlib.contextmanager
def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - non-POSIX: no cross-process lock
            yield
            return
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def encode_batch(tokenizer, problems, device, task=None):
    """Right-padded ``prompt + target + EOS`` ids with labels on the target and EOS only; the target is
    ``task.demonstration(problem)`` (a worked solution for tasks that have one), else the answer."""
    torch = require("torch", "hf")
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompts = tokenizer([p.prompt for p in problems], add_special_tokens=False)["input_ids"]
    targets = [task.demonstration(p) if task is not None else p.answer for p in problems]
    answers = tokenizer(targets, add_special_tokens=False)["input_ids"]
    seqs = [p + a + [eos] for p, a in zip(prompts, answers)]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, len(p): len(s)] = torch.tensor(s[len(p):])
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device), labels.to(device)


def teacher_forced_accuracy(model, ids, mask, labels) -> tuple[float, float]:
    """Exact accuracies of the reference answers from one forward pass (no sampling noise).

    With a_i the reference answer + EOS of problem i under teacher forcing:
    sampled = (1/P) Σ_i Π_t π(a_it | prompt, a_i<t)   (the probability that T = 1 sampling reproduces a_i),
    greedy  = (1/P) Σ_i 1[argmax π(· | prompt, a_i<t) = a_it for every t]   (greedy decoding emits a_i).
    Both count only the canonical spelling of the answer, so they are lower bounds of the verifier's accuracy.
    """
    torch = require("torch", "hf")
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    model.train(was_training)
    target = labels[:, 1:]
    valid = target != -100
    logp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    seq_logp = (logp * valid).sum(-1)
    hit = ((logits.argmax(-1) == target) | ~valid).all(-1)
    return float(seq_logp.exp().mean()), float(hit.float().mean())


def cold_start(task, seed: int = 0, config: SFTConfig | None = None, log=None):
    """Run the cold-start SFT (see module docstring); returns ``(model, tokenizer, card)`` without saving."""
    torch = require("torch", "hf")
    config = config or SFTConfig()
    log = log or (lambda msg: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _cold_start(task, seed, config, log)
    finally:
        torch.set_num_threads(threads)


def _cold_start(task, seed, config, log):
    torch = require("torch", "hf")
    from pgzoo.models.evaluate import evaluate
    from pgzoo.models.tiny import build_tiny_moe, build_tokenizer, check_characters, moe_shape

    t_start = time.perf_counter()
    tokenizer = build_tokenizer()
    model = build_tiny_moe(vocab_size=len(tokenizer), seed=seed, **moe_shape(config.model))
    check_characters(task)  # whole data files; samples of generated tasks
    val = encode_batch(tokenizer, task.sample(config.eval_n, "train", seed=10_000_019 + seed), "cpu", task)
    history: list[dict[str, float]] = []
    snapshots: collections.deque = collections.deque(maxlen=config.window)  # (check, weights) of the last checks
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                betas=(0.9, 0.98))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, config.warmup_steps)))
        step, stop_reason, last = 0, "max_steps", {}
        while step < config.max_steps:
            # 1. a fresh batch of train-split problems (reproducible: seeded by (seed, step))
            problems = task.sample(config.batch_size, "train", seed=seed * 1_000_003 + step)
            ids, mask, labels = encode_batch(tokenizer, problems, "cpu", task)
            # 2. cross-entropy on answer + EOS tokens
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                                     ignore_index=-100)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            # 3. the stopping rule: the mean of the last `window` checks, on train-split problems sampled with a
            # separate seed (one check swings by several points between consecutive steps at this learning rate)
            near = bool(history) and history[-1]["sampled_mean"] >= config.target / 2  # the rise is steep
            if step % config.eval_every == 0 or near:
                sampled, greedy = teacher_forced_accuracy(model, *val)
                recent = history[-(config.window - 1):] if config.window > 1 else []
                sampled_mean = (sampled + sum(h["sampled"] for h in recent)) / (len(recent) + 1)
                greedy_mean = (greedy + sum(h["greedy"] for h in recent)) / (len(recent) + 1)
                last = {"step": step, "loss": round(float(loss.detach()), 5), "sampled": round(sampled, 5),
                        "greedy": round(greedy, 5), "sampled_mean": round(sampled_mean, 5),
                        "greedy_mean": round(greedy_mean, 5), "seconds": round(time.perf_counter() - t_start, 2)}
                history.append(last)
                snapshots.append((last, {k: v.detach().clone() for k, v in model.state_dict().items()}))
                done = len(history) >= config.window and (sampled_mean >= config.target
                                                          or greedy_mean > config.greedy_max)
                if step % (10 * config.eval_every) == 0 or near or done:
                    log(f"step {step:5d} loss {last['loss']:.4f} sampled {sampled:.3f} greedy {greedy:.3f} "
                        f"(mean of {min(len(history), config.window)}: {sampled_mean:.3f} / {greedy_mean:.3f}; "
                        f"{last['seconds']:.1f}s)")
                if done:
                    stop_reason = "target" if greedy_mean <= config.greedy_max else "greedy_max"
                    # the weights of the median check of the window: on a steep rise the newest check overshoots
                    # the mean by tens of points, on a plateau it may be a swing; the median is neither
                    measure = "sampled" if stop_reason == "target" else "greedy"
                    ranked = sorted(snapshots, key=lambda snap: (snap[0][measure], snap[0]["step"]))
                    last, weights = ranked[len(ranked) // 2]
                    model.load_state_dict(weights)
                    break
            if config.max_seconds is not None and time.perf_counter() - t_start > config.max_seconds:
                stop_reason = "max_seconds"
                break
    model.eval()
    sft_seconds = time.perf_counter() - t_start
    # 4. held-out accuracy for the card
    test = task.sample(config.final_eval_n, "test", seed=seed)
    final = evaluate(model, tokenizer, task, test, k=1, temperature=1.0, max_new_tokens=config.max_new_tokens,
                     seed=seed)
    lo, hi = config.band
    card = {
        "task": task.name,
        "task_options": task.options,
        "seed": seed,
        "steps": step,
        "selected_step": last.get("step"),
        "stop_reason": stop_reason,
        "sft_seconds": round(sft_seconds, 2),
        "seconds": round(time.perf_counter() - t_start, 2),
        "train_sampled_accuracy": last.get("sampled"),
        "train_greedy_accuracy": last.get("greedy"),
        "test_sampled_accuracy": final["avg@1"],
        "test_greedy_accuracy": final["greedy_accuracy"],
        "test_problems": len(test),
        "accuracy": final["avg@1"],
        "in_band": bool(lo <= final["avg@1"] <= hi),
        "band": [lo, hi],
        "sft": dataclasses.asdict(config),
        "history": history,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "torch_threads": config.threads,
    }
    return model, tokenizer, card


def ensure_cold_start(task_name: str = "arithmetic", task_options: dict[str, Any] | None = None, seed: int = 0,
                      cache_dir: str | Path | None = None, *, force: bool = False, log=None,
                      **sft_options: Any) -> Path:
    """Path of the cached cold-start checkpoint for ``(task_name, task_options, seed, sft_options)``; trains it first
    when missing (or when ``force``). See the module docstring for the stopping rule and the cache key."""
    import pgzoo.tasks
    from pgzoo.fileio import verify_folder
    from pgzoo.models.tiny import read_card, save_pretrained

    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"cold start: seed={seed!r}; use an integer")
    task = pgzoo.tasks.get(task_name, **(task_options or {}))
    from pgzoo.models.tiny import check_characters

    check_characters(task)  # at task load, cached checkpoint or not: never <unk> at run time
    config = SFTConfig.from_options(sft_options)
    key = cache_key(pgzoo.tasks.base.canonical(task_name), task.fingerprint(), seed, config)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = root / "cold-start" / f"{task.name}-{key}"
    with _lock(root / "cold-start" / f".{task.name}-{key}.lock"):
        complete = all((path / f).is_file() for f in ("config.json", "tokenizer.json", "model.safetensors"))
        if complete and verify_folder(path) is not None:  # damaged (truncated weights, checksum): rebuilt below
            complete = False
        if not force and complete:
            try:
                card = read_card(path)
            except ConfigError:  # a damaged cache entry is rebuilt, not reported
                card = None
            if card is not None and card.get("seed") == seed and card.get("cache_key") == key:
                return path
        if log is not None:  # the first run on a machine spends its first minutes here: say so
            log(f"pgzoo: training the cold start of the embedded policy for task {task.name!r} (seed {seed}), once: "
                f"supervised fine-tuning, a minute or two on 2 cores; cached in {path}")
        model, tokenizer, card = cold_start(task, seed=seed, config=config, log=log)
        card["cache_key"] = key
        save_pretrained(model, tokenizer, path, card=card)
        if log is not None:
            log(f"pgzoo: cold start ready after {card.get('steps')} steps, {card.get('seconds')} s (held-out greedy "
                f"accuracy {card.get('test_greedy_accuracy')})")
    return path
