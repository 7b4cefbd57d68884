"""Evaluation: the unbiased pass@k estimator, metrics on scripted policies with known answers, the CLI."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

import pgzoo.tasks
from pgzoo.errors import ConfigError
from pgzoo.models.evaluate import evaluate, pass_at_k
from pgzoo.models import build_tiny_moe, build_tokenizer, save_pretrained

pytestmark = pytest.mark.usefixtures("one_torch_thread")



@pytest.mark.parametrize("n, c, k", [(n, c, k) for n in range(1, 7) for c in range(n + 1) for k in range(1, n + 1)])
def test_pass_at_k_matches_subset_enumeration(n, c, k):
    outcomes = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(outcomes, k))
    naive = sum(any(s) for s in subsets) / len(subsets)  # fraction of k-subsets with at least one success
    assert pass_at_k(n, c, k) == pytest.approx(naive, abs=1e-12)


def test_pass_at_k_rejects_bad_counts():
    for n, c, k in [(3, 4, 1), (3, 1, 0), (3, 1, 4)]:
        with pytest.raises(ConfigError):
            pass_at_k(n, c, k)


class ScriptedPolicy(torch.nn.Module):
    """A stand-in for a causal LM whose ``generate`` writes chosen answers: greedy gives the right answer to the
    problems in ``greedy_right``; sampling gives the right answer with probability ``p_right`` (seeded)."""

    def __init__(self, tok, answers: dict[str, str], greedy_right: set[str], p_right: float, extra: str = ""):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.tok, self.answers, self.greedy_right, self.p_right, self.extra = tok, answers, greedy_right, p_right, extra

    def generate(self, input_ids, attention_mask, max_new_tokens, do_sample, num_return_sequences=1, **kw):
        rows = []
        for ids in input_ids:
            prompt = self.tok.decode(ids, skip_special_tokens=True)
            for _ in range(num_return_sequences):
                right = torch.rand(()) < self.p_right if do_sample else prompt in self.greedy_right
                text = (self.answers[prompt] if right else "x") + self.extra
                out = self.tok(text, add_special_tokens=False)["input_ids"][:max_new_tokens]
                out = out + [self.tok.eos_token_id] * (max_new_tokens + 1 - len(out))
                rows.append(ids.tolist() + out[: max_new_tokens])
        return torch.tensor(rows)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_scripted_metrics_exact(tok):
    task = pgzoo.tasks.get("arithmetic")
    problems = task.sample(40, "test", seed=0)
    answers = {p.prompt: p.answer for p in problems}
    greedy_right = {p.prompt for p in problems[:10]}
    # p_right = 1: every sample right; p_right = 0: none
    m = evaluate(ScriptedPolicy(tok, answers, greedy_right, 1.0), tok, task, problems, k=4, batch_size=7)
    assert m["greedy_accuracy"] == pytest.approx(0.25)
    assert m["avg@4"] == 1.0 and m["pass@4"] == 1.0
    assert m["greedy_eos_fraction"] == 1.0
    m = evaluate(ScriptedPolicy(tok, answers, set(), 0.0), tok, task, problems, k=2)
    assert m["greedy_accuracy"] == 0.0 and m["avg@2"] == 0.0 and m["pass@2"] == 0.0


def test_scripted_metrics_statistical(tok):
    task = pgzoo.tasks.get("arithmetic")
    problems = task.sample(300, "test", seed=1)
    answers = {p.prompt: p.answer for p in problems}
    p = 0.3
    m = evaluate(ScriptedPolicy(tok, answers, set(), p), tok, task, problems, k=4, n_samples=8, seed=0)
    # avg@4 ~ p; pass@4 ~ 1-(1-p)^4 for independent samples; 300 problems x 8 samples: se ~ 0.01
    assert m["avg@4"] == pytest.approx(p, abs=0.05)
    assert m["pass@4"] == pytest.approx(1 - (1 - p) ** 4, abs=0.06)
    again = evaluate(ScriptedPolicy(tok, answers, set(), p), tok, task, problems, k=4, n_samples=8, seed=0)
    assert again == m  # seeded


def test_completion_cut_at_eos_and_extra_text(tok):
    task = pgzoo.tasks.get("arithmetic")
    problems = task.sample(20, "test", seed=2)
    answers = {p.prompt: p.answer for p in problems}
    m = evaluate(ScriptedPolicy(tok, answers, {p.prompt for p in problems}, 1.0, extra=" ok"), tok, task, problems,
                 max_new_tokens=8)
    assert m["greedy_accuracy"] == 1.0


def test_evaluate_input_errors(tok):
    task = pgzoo.tasks.get("arithmetic")
    model = ScriptedPolicy(tok, {}, set(), 0.0)
    with pytest.raises(ConfigError, match="problems is empty"):
        evaluate(model, tok, task, [])
    probs = task.sample(2)
    with pytest.raises(ConfigError, match="k=0"):
        evaluate(model, tok, task, probs, k=0)
    with pytest.raises(ConfigError, match="n_samples=2 < k=4"):
        evaluate(model, tok, task, probs, k=4, n_samples=2)
    with pytest.raises(ConfigError, match="temperature"):
        evaluate(model, tok, task, probs, temperature=0.0)


def test_real_model_generation_runs_and_is_seeded(tok):
    model = build_tiny_moe(vocab_size=len(tok), seed=0)
    task = pgzoo.tasks.get("arithmetic")
    problems = task.sample(16, "test", seed=0)
    a = evaluate(model, tok, task, problems, k=2, max_new_tokens=4, seed=5)
    b = evaluate(model, tok, task, problems, k=2, max_new_tokens=4, seed=5)
    assert a == b
    assert set(a) >= {"greedy_accuracy", "avg@2", "pass@2"}
    assert 0 <= a["avg@2"] <= a["pass@2"] <= 1
    assert 1 <= a["mean_completion_tokens"] <= 4


def test_cli_eval(tok, tmp_path, capsys):
    from pgzoo.cli.main import main

    model = build_tiny_moe(vocab_size=len(tok), seed=0)
    card = {"task": "arithmetic", "task_options": {"max_digits": 1}}
    path = save_pretrained(model, tok, tmp_path / "ckpt", card=card)
    assert main(["eval", str(path), "--n", "8", "--k", "2", "--max-new-tokens", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"greedy_accuracy", "avg@2", "pass@2", "seconds"} <= set(out) and out["num_problems"] == 8
    assert main(["eval", str(tmp_path / "nope"), "--task", "arithmetic"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", str(path), "--task", "arithmetc"]) == 2
    assert "Did you mean 'arithmetic'" in capsys.readouterr().err
    assert main(["eval", str(path), "--task-option", "operators=/"]) == 2
    assert "unknown operator" in capsys.readouterr().err
    assert main(["eval", str(path), "--threads", "-1"]) == 2
    assert "--threads -1" in capsys.readouterr().err
    assert not math.isnan(out["greedy_accuracy"])


def test_heldout_problems_never_repeat_and_say_when_the_split_is_small():
    import pgzoo.tasks
    from pgzoo.models.evaluate import heldout_problems

    task = pgzoo.tasks.get("arithmetic", max_digits=1, operands=2)
    size = task.split_size("test")
    said = []
    probs = heldout_problems(task, size + 50, seed=3, say=said.append)
    assert len(probs) == size == len({p.prompt for p in probs})
    assert said and f"holds {size}; evaluating all {size} once" in said[0]
    said.clear()
    assert len(heldout_problems(task, 5, say=said.append)) == 5 and not said


def test_heldout_problems_rejects_a_task_that_returns_too_few():
    from pgzoo.models.evaluate import heldout_problems
    from pgzoo.tasks.base import Problem, Task

    class Short(Task):
        name = "short"

        def sample(self, n, split="train", seed=0):
            return [Problem(prompt="1+1=", answer="2")] * (n - 1)

    with pytest.raises(ConfigError, match=r"sample\(n=3, split='test', seed=0\) returned 2 problems"):
        heldout_problems(Short(), 3)


def test_a_run_folder_resolves_to_its_newest_intact_checkpoint(tmp_path):
    from pgzoo.models.evaluate import resolve_checkpoint
    from pgzoo.fileio import atomic_folder

    run = tmp_path / "run"
    for step in (20, 40):
        with atomic_folder(run / "checkpoints" / f"step-{step:06d}") as tmp:
            (tmp / "config.json").write_text("{}")
    assert resolve_checkpoint(run) == run / "checkpoints" / "step-000040"
    (run / "checkpoints" / "step-000040" / "config.json").write_text('{"x": 1}')  # damaged: skipped, not moved
    assert resolve_checkpoint(run) == run / "checkpoints" / "step-000020"
    assert (run / "checkpoints" / "step-000040").is_dir()
    assert resolve_checkpoint(run / "checkpoints" / "step-000020") == run / "checkpoints" / "step-000020"
    (run / "checkpoints" / "step-000020" / "config.json").write_text("")
    with pytest.raises(ConfigError, match="holds no intact checkpoint"):
        resolve_checkpoint(run)
