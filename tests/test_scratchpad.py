"""The ``scratchpad`` task: worked column addition, final-line verifier (malformed outputs score 0, never raise),
splits, options, and the cold start training on the worked solution."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pgzoo.tasks
from pgzoo.errors import ConfigError
from pgzoo.models.tiny import build_tokenizer
from pgzoo.tasks.scratchpad import column_lines, final_line_integer


@pytest.fixture(scope="module")
def task():
    return pgzoo.tasks.get("scratchpad")


def test_worked_solution_carries_and_final_line(task):
    p = task.problem([4738, 2956])
    assert (p.prompt, p.answer) == ("4738+2956=", "7694")
    assert task.solution(p) == "8+6+0=14\n3+5+1=09\n7+9+0=16\n4+2+1=07\n7694"
    assert task.demonstration(p) == task.solution(p)
    assert task.solution(task.problem([999, 5])) == "9+5+0=14\n9+0+1=10\n9+0+1=10\n1004"  # shorter operand: 0s
    three = pgzoo.tasks.get("scratchpad", operands=3)
    assert three.solution(three.problem([99, 99, 99])) == "9+9+9+0=27\n9+9+9+2=29\n297"
    assert task.verify(task.solution(p), p.answer)


@given(st.lists(st.integers(0, 10**9 - 1), min_size=2, max_size=4))
@settings(max_examples=200, deadline=None)
def test_column_lines_always_sum_correctly(xs):
    lines, total = column_lines(xs)
    assert total == sum(xs)
    digits = "".join(line.split("=")[1][-1] for line in lines)[::-1]
    carry = int(lines[-1].split("=")[1]) // 10
    assert int((str(carry) if carry else "") + digits) == sum(xs)


@pytest.mark.parametrize("completion,ok", [
    ("8+6+0=14\n3+5+1=09\n7+9+0=16\n4+2+1=07\n7694", True),
    ("7694", True), (" 7694 \n\n", True), ("=7694", True), ("+7694", True), ("garbage\n07694", True),
    ("8+6+0=14\n7694 is the answer", False), ("7694\n8+6+0=14", False),  # only the final line counts
    ("", False), ("\n\n  \n", False), ("7693", False), ("76 94x", False), ("-7694", False), ("7.694", False),
    ("1" * 200, False), ("\x00\udcff", False), ("٧٦٩٤", False),  # not ASCII digits
])
def test_verifier_final_line(task, completion, ok):
    assert task.verify(completion, "7694") is ok
    assert task.reward(completion, task.problem([4738, 2956])) == (1.0 if ok else 0.0)


@given(st.text(max_size=300))
@settings(max_examples=300, deadline=None)
def test_verifier_never_raises(text):
    task = pgzoo.tasks.get("scratchpad")
    assert task.verify(text, "7694") in (True, False)
    assert final_line_integer(text) is None or isinstance(final_line_integer(text), int)
    assert task.verify(text, "not a number") is False


def test_non_string_completion_scores_zero(task):
    assert task.verify(None, "7") is False and final_line_integer(b"7") is None


def test_sampling_splits_lengths_and_characters(task):
    a, b = task.sample(300, "train", seed=3), task.sample(300, "train", seed=3)
    assert a == b and len({p.prompt for p in a}) == 300
    test = task.sample(200, "test", seed=3)
    assert not {p.prompt for p in a} & {p.prompt for p in test}
    vocab = set(build_tokenizer().get_vocab())
    lengths = [len(task.solution(p)) + 1 for p in a]
    lo, hi = task.solution_tokens
    assert lo <= min(lengths) and max(lengths) <= hi and (lo, hi) == (41, 42)
    assert all(set(p.prompt + task.solution(p)) <= vocab for p in a)
    digits = {len(p.prompt.split("+")[0]) for p in a}
    assert digits == {4}
    assert pgzoo.tasks.get("scratchpad", operands=3, min_digits=7, max_digits=7).solution_tokens == (85, 86)
    mixed = pgzoo.tasks.get("scratchpad", min_digits=1, max_digits=3)
    assert {len(p.prompt.split("+")[0]) for p in mixed.sample(200, seed=0)} == {1, 2, 3}


@pytest.mark.parametrize("opts,match", [
    (dict(operands=1), "operands=1"), (dict(operands=5), "operands=5"), (dict(min_digits=0), "min_digits=0"),
    (dict(max_digits=10), "max_digits=10"), (dict(min_digits=4, max_digits=3), "max_digits=3 < min_digits=4"),
    (dict(operands=True), "operands=True"), (dict(test_fraction=1.0), "test_fraction"),
    (dict(levels=3), "Valid options"),
])
def test_bad_options(opts, match):
    with pytest.raises(ConfigError, match=match):
        pgzoo.tasks.get("scratchpad", **opts)


def test_cold_start_trains_on_the_worked_solution(task):
    from pgzoo.models.cold_start import encode_batch

    tok = build_tokenizer()
    p = task.problem([12, 34])
    ids, mask, labels = encode_batch(tok, [p], "cpu", task)
    target = tok.decode([t for t in labels[0].tolist() if t != -100][:-1])
    assert target == "2+4+0=06\n1+3+0=04\n46"
    _, _, labels_plain = encode_batch(tok, [p], "cpu")  # without the task: the bare answer, as before
    assert tok.decode([t for t in labels_plain[0].tolist() if t != -100][:-1]) == "46"


@pytest.mark.slow
def test_cold_start_learns_the_format_on_a_small_budget(one_torch_thread):
    """A short SFT on 2-digit problems (21-token solutions) already writes the worked format — one column line per
    digit, two-digit sums, the answer on the final line, then EOS — even where the arithmetic is still wrong."""
    import re

    import torch

    from pgzoo.models.evaluate import generate_completions
    from pgzoo.models.cold_start import SFTConfig, cold_start

    task = pgzoo.tasks.get("scratchpad", min_digits=2, max_digits=2)
    config = SFTConfig(batch_size=32, max_steps=120, eval_every=40, eval_n=64, final_eval_n=32, max_new_tokens=24,
                       target=1.0, greedy_max=1.0)
    model, tok, card = cold_start(task, seed=0, config=config)
    assert card["steps"] == 120
    problems = task.sample(64, "test", seed=1)
    texts, _, ended = generate_completions(model, tok, [p.prompt for p in problems], max_new_tokens=24)
    form = re.compile(r"(\d\+\d\+\d=\d\d\n){2}\d{2,3}")
    shaped = [bool(form.fullmatch(t)) for t in texts]
    assert sum(shaped) / len(shaped) >= 0.9 and sum(ended) / len(ended) >= 0.9, texts[:4]
    # the format is learnt before the arithmetic: the answers are not all right yet (room for RL)
    assert 0 < sum(task.verify(t, p.answer) for t, p in zip(texts, problems)) < len(problems)
    assert torch.isfinite(torch.tensor(card["train_sampled_accuracy"]))
