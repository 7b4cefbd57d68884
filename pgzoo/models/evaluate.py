"""Evaluate a policy on a task: greedy accuracy, avg@k and pass@k at a temperature (batched transformers generate).

    from pgzoo.models.evaluate import evaluate
    task = pgzoo.tasks.get("arithmetic")
    metrics = evaluate(model, tokenizer, task, task.sample(200, split="test"), k=8, temperature=1.0)
    # {"greedy_accuracy": ..., "avg@8": ..., "pass@8": ..., ...}

    # on the command line: pgzoo eval CHECKPOINT --task arithmetic --k 8 --temperature 1.0 --n 200

Definitions, over P problems with ``n_samples`` (default k) sampled completions each, c_i of them correct:

- ``greedy_accuracy`` = (1/P) Σ_i 1[greedy completion of problem i is correct]
- ``avg@k``  = (1/P) Σ_i c_i / n_samples                        (mean sampled accuracy at ``temperature``)
- ``pass@k`` = (1/P) Σ_i [1 − C(n − c_i, k) / C(n, k)]          (the unbiased estimator of Chen et al., 2021)

Sampling is pure temperature sampling (top_k = 0, top_p = 1), matching what an RL rollout engine samples.
Completions are decoded up to the first EOS, special tokens dropped, then scored with ``task.verify``.
Extra keys: ``num_problems``, ``num_samples``, ``greedy_eos_fraction`` (greedy completions that ended with EOS
within ``max_new_tokens``) and ``mean_completion_tokens`` (greedy).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pgzoo.errors import ConfigError, require


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples with ``c`` correct: 1 − C(n − c, k) / C(n, k)."""
    if not 0 < k <= n or not 0 <= c <= n:
        raise ConfigError(f"pass_at_k: need 0 < k <= n and 0 <= c <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def resolve_checkpoint(path) -> Path:
    """``path`` itself, or for a ``pgzoo train`` run folder (one with ``checkpoints/step-*``) its newest checkpoint
    that matches its manifest (damaged ones are skipped, never moved: evaluation only reads)."""
    from pgzoo.fileio import verify_folder

    path = Path(path)
    if (path / "config.json").exists() or not (path / "checkpoints").is_dir():
        return path
    for ckpt in sorted((p for p in (path / "checkpoints").glob("step-*") if p.is_dir()), reverse=True):
        if verify_folder(ckpt) is None:
            return ckpt
    raise ConfigError(f"run folder {path} holds no intact checkpoint (checkpoints/step-*); evaluate a checkpoint "
                      "folder directly, or train until one is written (output.checkpoint_every)")


def heldout_problems(task, n: int, *, split: str = "test", seed: int = 0, say=None) -> list:
    """``n`` distinct problems of ``split`` for evaluation: never a problem twice, which would weight it twice in the
    accuracy. When the split holds fewer than ``n`` problems, the whole split is used once, and ``say`` (a print-like
    callable) is told so."""
    size_of = getattr(task, "split_size", None)
    size = size_of(split) if size_of is not None else None
    if size is not None and n > size:
        if say is not None:
            say(f"pgzoo: {n} evaluation problems asked but the {split} split of task {task.name!r} holds {size}; "
                f"evaluating all {size} once")
        n = size
    return task.sample(n, split=split, seed=seed)  # Task checks that exactly n come back


def generate_completions(model, tokenizer, prompts: list[str], *, num_return_sequences: int = 1,
                         do_sample: bool = False, temperature: float = 1.0, max_new_tokens: int = 32,
                         batch_size: int = 256, seed: int | None = 0) -> tuple[list[str], list[int], list[bool]]:
    """Batched ``model.generate``; returns (texts, token counts, ended-with-EOS) per completion, prompt-major."""
    torch = require("torch", "hf")
    device = next(model.parameters()).device
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    texts: list[str] = []
    lengths: list[int] = []
    ended: list[bool] = []
    was_training = model.training
    model.eval()
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            if seed is not None:
                torch.manual_seed(seed)
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start:start + batch_size]
                enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
                kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad,
                                              num_return_sequences=num_return_sequences, do_sample=do_sample)
                if do_sample:
                    kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
                out = model.generate(**enc, **kwargs)
                comp = out[:, enc["input_ids"].shape[1]:].tolist()
                for row in comp:
                    n = row.index(eos) + 1 if eos in row else len(row)
                    ended.append(eos in row)
                    lengths.append(n)
                    texts.append(tokenizer.decode(row[: n - 1 if eos in row else n], skip_special_tokens=True))
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return texts, lengths, ended


def evaluate(model, tokenizer, task, problems, *, k: int = 1, temperature: float = 1.0,
             max_new_tokens: int = 32, n_samples: int | None = None, batch_size: int = 256,
             seed: int = 0, greedy: bool = True) -> dict[str, float]:
    """Greedy accuracy plus avg@k / pass@k of ``model`` on ``problems`` (see module docstring for definitions)."""
    if not problems:
        raise ConfigError("evaluate: problems is empty; pass task.sample(n, split='test') with n > 0")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"evaluate: k={k!r}; use an integer >= 1")
    n_samples = k if n_samples is None else n_samples
    if n_samples < k:
        raise ConfigError(f"evaluate: n_samples={n_samples} < k={k}; pass@k needs at least k samples per problem")
    if not temperature > 0:
        raise ConfigError(f"evaluate: temperature={temperature!r}; use a value > 0 (greedy accuracy is always "
                          "reported)")
    prompts = [p.prompt for p in problems]
    metrics: dict[str, float] = {"num_problems": float(len(problems)), "num_samples": float(n_samples)}
    if greedy:
        texts, lengths, ended = generate_completions(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                                     batch_size=batch_size, seed=seed)
        metrics["greedy_accuracy"] = sum(task.verify(t, p.answer) for t, p in zip(texts, problems)) / len(problems)
        metrics["greedy_eos_fraction"] = sum(ended) / len(ended)
        metrics["mean_completion_tokens"] = sum(lengths) / len(lengths)
    texts, _, _ = generate_completions(model, tokenizer, prompts, num_return_sequences=n_samples, do_sample=True,
                                       temperature=temperature, max_new_tokens=max_new_tokens,
                                       batch_size=max(1, batch_size // n_samples), seed=seed)
    correct = [0] * len(problems)
    for j, t in enumerate(texts):
        i = j // n_samples
        correct[i] += task.verify(t, problems[i].answer)
    metrics[f"avg@{k}"] = sum(correct) / (len(problems) * n_samples)
    metrics[f"pass@{k}"] = sum(pass_at_k(n_samples, c, k) for c in correct) / len(problems)
    return metrics
