"""Tasks: registry, arithmetic problems and splits, verifier edge cases, JSONL loading and its errors."""

from __future__ import annotations

import json

import pytest

import pgzoo.tasks
from pgzoo.errors import ConfigError, PgzooError, UnknownNameError
from pgzoo.tasks.arithmetic import evaluate_expression
from pgzoo.tasks.math import normalised_match

pytestmark = pytest.mark.usefixtures("one_torch_thread")



# -- registry ---------------------------------------------------------------------------------------------------
def test_available_and_unknown_name_suggests():
    assert {"arithmetic", "math"} <= set(pgzoo.tasks.available())
    assert pgzoo.tasks.available("arith*") == ["arithmetic"]
    with pytest.raises(UnknownNameError, match="Did you mean 'arithmetic'"):
        pgzoo.tasks.get("arithmetc")


def test_register_duplicate_raises_and_override_works():
    @pgzoo.tasks.register("echo-test")
    class Echo(pgzoo.tasks.Task):
        def sample(self, n, split="train", seed=0):
            return [pgzoo.tasks.Problem("a", "a")] * n

        def verify(self, completion, answer):
            return completion == answer

    try:
        with pytest.raises(ConfigError, match="already registered"):
            @pgzoo.tasks.register("echo-test")
            class Other(Echo):
                pass

        task = pgzoo.tasks.get("echo_test")  # underscores accepted
        assert task.reward("a", task.sample(1)[0]) == 1.0
    finally:
        pgzoo.tasks.unregister("echo-test")
    assert "echo-test" not in pgzoo.tasks.available()


def test_unknown_option_lists_valid_ones():
    with pytest.raises(ConfigError, match="max_digits"):
        pgzoo.tasks.get("arithmetic", digits=3)


# -- arithmetic ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("opts", [dict(operands=1), dict(min_digits=0), dict(max_digits=0),
                                  dict(min_digits=3, max_digits=2), dict(operators="/"), dict(operators="+^"),
                                  dict(operators=""), dict(test_fraction=0.0), dict(test_fraction=1.5),
                                  dict(operands=2.5), dict(max_digits=12)])
def test_impossible_settings_raise(opts):
    with pytest.raises(ConfigError):
        pgzoo.tasks.get("arithmetic", **opts)


def test_unknown_operator_message_names_it():
    with pytest.raises(ConfigError, match=r"unknown operator\(s\) '/'"):
        pgzoo.tasks.get("arithmetic", operators="+/")


def test_expression_precedence_against_python():
    import itertools
    import random

    rng = random.Random(0)
    for _ in range(500):
        k = rng.randint(2, 5)
        xs = [rng.randint(0, 99) for _ in range(k)]
        ops = [rng.choice("+-*") for _ in range(k - 1)]
        expr = "".join(f"{x}{o}" for x, o in itertools.zip_longest(xs, ops, fillvalue=""))
        assert evaluate_expression(xs, ops) == eval(expr)  # naive reference  # noqa: S307


def test_sample_format_answers_and_tokenizer_coverage():
    from pgzoo.models import build_tokenizer

    tok = build_tokenizer()
    task = pgzoo.tasks.get("arithmetic", operands=3, min_digits=1, max_digits=3, operators="+-*")
    vocab = set(tok.get_vocab())
    for p in task.sample(200, seed=1):
        assert p.prompt.endswith("=")
        assert int(p.answer) == eval(p.prompt[:-1])  # noqa: S307
        assert set(p.prompt + p.answer) <= vocab
        assert tok.decode(tok(p.prompt + p.answer)["input_ids"]) == p.prompt + p.answer


def test_digit_range_respected():
    task = pgzoo.tasks.get("arithmetic", min_digits=2, max_digits=3)
    for p in task.sample(300, seed=0):
        a, b = p.prompt[:-1].split("+")
        assert 2 <= len(a) <= 3 and 2 <= len(b) <= 3 and not a.startswith("0")


@pytest.mark.parametrize("opts", [dict(), dict(operands=3, max_digits=3, operators="+-*")])  # enumerated / rejection
def test_splits_disjoint_reproducible(opts):
    task = pgzoo.tasks.get("arithmetic", **opts)
    train = task.sample(800, "train", seed=0)
    test = task.sample(300, "test", seed=0)
    assert not {p.prompt for p in train} & {p.prompt for p in test}
    assert train == task.sample(800, "train", seed=0)
    assert train != task.sample(800, "train", seed=1)
    # distinct while the split has enough problems
    assert len({p.prompt for p in test}) == len(test)
    # split membership is a function of the prompt alone
    for p in test[:50]:
        assert pgzoo.tasks.split_of(p.prompt, task.test_fraction) == "test"


def test_enumerated_split_sizes_and_fraction():
    task = pgzoo.tasks.get("arithmetic")
    n_train, n_test = task.split_size("train"), task.split_size("test")
    assert n_train + n_test == task.space_size == 100 * 100
    assert 0.08 < n_test / task.space_size < 0.12
    # more than the split holds: repeats, but never from the other split
    many = task.sample(n_test + 10, "test", seed=0)
    assert len(many) == n_test + 10 and len({p.prompt for p in many}) <= n_test


def test_empty_split_raises():
    with pytest.raises(ConfigError, match="split is empty"):
        pgzoo.tasks.get("arithmetic", max_digits=1, operands=2, test_fraction=0.001).sample(1, "test")


def test_bad_split_and_count():
    task = pgzoo.tasks.get("arithmetic")
    with pytest.raises(ConfigError, match="split='valid'"):
        task.sample(3, "valid")
    with pytest.raises(ConfigError, match="n=-1"):
        task.sample(-1)


@pytest.mark.parametrize("completion, expected", [
    ("19", True), (" 19", True), ("19\n", True), ("\t 19  ", True),
    ("019", True), ("0019", True),                       # leading zeros: compared by value
    ("19 is the answer", True), ("The answer is 19.", True), ("19abc", True),
    ("", False), ("   ", False), ("abc", False), ("18", False), ("1 9", False), ("-19", False), ("190", False),
])
def test_arithmetic_verifier_edge_cases(completion, expected):
    task = pgzoo.tasks.get("arithmetic")
    assert task.verify(completion, "19") is expected
    assert task.reward(completion, pgzoo.tasks.Problem("12+7=", "19")) == float(expected)


@pytest.mark.parametrize("completion, expected", [("-5", True), (" -5", True), ("-05", True), ("5", False),
                                                  ("- 5", False), ("+5", False)])
def test_arithmetic_verifier_negatives(completion, expected):
    task = pgzoo.tasks.get("arithmetic", operators="-")
    assert task.verify(completion, "-5") is expected


def test_negative_answers_generated():
    task = pgzoo.tasks.get("arithmetic", operators="-")
    problems = task.sample(200, seed=0)
    assert any(p.answer.startswith("-") for p in problems)
    assert all(task.reward(p.answer, p) == 1.0 for p in problems)


def test_rewards_length_mismatch():
    task = pgzoo.tasks.get("arithmetic")
    with pytest.raises(ConfigError, match="one problem per completion"):
        task.rewards(["1", "2"], task.sample(1))


# -- math (JSONL) -------------------------------------------------------------------------------------------------
def _write(tmp_path, lines, name="p.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def test_math_loads_and_splits(tmp_path):
    rows = [json.dumps({"question": f"What is {i} + {i}?", "final": str(2 * i)}) for i in range(200)]
    path = _write(tmp_path, rows[:100] + [""] + rows[100:])  # a blank line is skipped
    task = pgzoo.tasks.get("math", path=path, problem_field="question", answer_field="final")
    train, test = task.splits["train"], task.splits["test"]
    assert len(train) + len(test) == 200 and test and train
    assert not {p.prompt for p in train} & {p.prompt for p in test}
    p = task.sample(1, "test", seed=0)[0]
    assert p.prompt.startswith("What is") and p.prompt.endswith("Answer: ")
    assert task.reward(p.answer, p) == 1.0
    assert task.sample(5, seed=3) == task.sample(5, seed=3)


def test_math_fingerprint_follows_file_content(tmp_path):
    path = _write(tmp_path, [json.dumps({"problem": "1+1", "answer": "2"})])
    a = pgzoo.tasks.get("math", path=path).fingerprint()
    _write(tmp_path, [json.dumps({"problem": "1+1", "answer": "3"})])
    b = pgzoo.tasks.get("math", path=path).fingerprint()
    assert a["sha256"] != b["sha256"] and {k: v for k, v in a.items() if k != "sha256"} == pgzoo.tasks.get(
        "math", path=path).options
    assert pgzoo.tasks.get("arithmetic").fingerprint() == pgzoo.tasks.get("arithmetic").options


def test_math_template_with_latex_braces(tmp_path):
    path = _write(tmp_path, [json.dumps({"problem": "1+1", "answer": "2"})])
    task = pgzoo.tasks.get("math", path=path, template="Q: {problem}. Put the answer in \\boxed{}: ", test_fraction=0.5)
    p = [q for s in ("train", "test") for q in task.splits[s]][0]
    assert p.prompt == "Q: 1+1. Put the answer in \\boxed{}: "


def test_math_split_field(tmp_path):
    path = _write(tmp_path, [json.dumps({"problem": "a", "answer": "1", "split": "test"}),
                             json.dumps({"problem": "b", "answer": "2", "split": "train"})])
    task = pgzoo.tasks.get("math", path=path, split_field="split")
    assert [p.answer for p in task.splits["test"]] == ["1"]
    bad = _write(tmp_path, [json.dumps({"problem": "a", "answer": "1", "split": "dev"})], "bad.jsonl")
    with pytest.raises(ConfigError, match="line 1"):
        pgzoo.tasks.get("math", path=bad, split_field="split")


@pytest.mark.parametrize("bad_line, match", [
    ('{"problem": "x", "answer": ', "line 3 .* not valid JSON"),
    ("[1, 2]", "line 3 .* not a JSON object"),
    ('{"problem": "x"}', "line 3 .* no field 'answer'"),
])
def test_math_bad_line_names_line_number(tmp_path, bad_line, match):
    good = json.dumps({"problem": "1+1", "answer": "2"})
    path = _write(tmp_path, [good, good, bad_line, good])
    with pytest.raises(ConfigError, match=match):
        pgzoo.tasks.get("math", path=path)


def test_math_missing_or_empty_file(tmp_path):
    with pytest.raises(ConfigError, match="path is required"):
        pgzoo.tasks.get("math")
    with pytest.raises(ConfigError, match="not a file"):
        pgzoo.tasks.get("math", path=tmp_path / "nope.jsonl")
    with pytest.raises(ConfigError, match="holds no problems"):
        pgzoo.tasks.get("math", path=_write(tmp_path, ["", ""]))
    with pytest.raises(ConfigError, match="template"):
        pgzoo.tasks.get("math", path=_write(tmp_path, ['{"problem": "a", "answer": "1"}'], "x.jsonl"),
                        template="no placeholder")


MATH_CASES = [
    ("19", "19", True), (" 19 ", "19", True), ("019", "19", True), ("The answer is 19.", "19", True),
    ("\\boxed{19}", "19", True), ("-5", "-5", True), ("5", "-5", False), ("", "19", False),
    ("18", "19", False), ("0.5", "1/2", True),
]


@pytest.mark.parametrize("verifier", ["math-verify", "exact"])
@pytest.mark.parametrize("completion, answer, expected", MATH_CASES)
def test_math_verifier_edge_cases(tmp_path, verifier, completion, answer, expected):
    pytest.importorskip("math_verify") if verifier == "math-verify" else None
    path = _write(tmp_path, [json.dumps({"problem": "p", "answer": answer})])
    task = pgzoo.tasks.get("math", path=path, verifier=verifier)
    assert task.verifier == verifier
    assert task.verify(completion, answer) is expected


def test_math_verify_symbolic(tmp_path):
    pytest.importorskip("math_verify")
    path = _write(tmp_path, [json.dumps({"problem": "p", "answer": "\\frac{1}{2}"})])
    task = pgzoo.tasks.get("math", path=path)
    assert task.verify("so it is $\\frac{2}{4}$", "\\frac{1}{2}")
    assert not task.verify("so it is $\\frac{1}{3}$", "\\frac{1}{2}")


def test_normalised_match_fallback_rules():
    assert normalised_match("answer: 1,000", "1000")
    assert normalised_match("Final answer is $x+1$.", "x+1")
    assert not normalised_match("x+2", "x+1")
    assert not normalised_match("   ", "0")


def test_errors_are_pgzoo_errors():
    with pytest.raises(PgzooError):
        pgzoo.tasks.get("arithmetic", operators="%")


# -- silent data problems made visible ----------------------------------------------------------------------------
def test_a_task_returning_fewer_problems_than_asked_is_an_error():
    class Short(pgzoo.tasks.Task):
        name = "short"

        def sample(self, n, split="train", seed=0):
            return [pgzoo.tasks.Problem("1+1=", "2")] * min(n, 3)

        def verify(self, completion, answer):
            return completion == answer

    class Wrong(Short):
        def sample(self, n, split="train", seed=0):
            return ["1+1="] * n

    class Generator(Short):
        def sample(self, n, split="train", seed=0):
            return (pgzoo.tasks.Problem(str(i), str(i)) for i in range(n))

    assert len(Short().sample(3)) == 3
    with pytest.raises(ConfigError, match=r"task 'short': sample\(n=8, split='test', seed=1\) returned 3 problems; "
                                          r"a task must return exactly n"):
        Short().sample(8, "test", 1)
    with pytest.raises(ConfigError, match="returned a str"):
        Wrong().sample(2)
    assert [p.answer for p in Generator().sample(3)] == ["0", "1", "2"]  # any iterable of n problems is a list


def _jsonl(tmp_path, rows, name="p.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


@pytest.mark.parametrize("value,what", [(None, "null"), ("  ", "blank"), (True, "a bool"), ([1, 2], "a list"),
                                        ({"x": 1}, "a dict")])
def test_math_null_or_non_text_answer_names_the_line(tmp_path, value, what):
    rows = [{"problem": "1+1", "answer": "2"}, {"problem": "2+2", "answer": value}]
    with pytest.raises(ConfigError, match=rf"line 2 of .*p.jsonl: 'answer' is {what}"):
        pgzoo.tasks.get("math", path=str(_jsonl(tmp_path, rows)))
    rows = [{"problem": None, "answer": "2"}]
    with pytest.raises(ConfigError, match=r"line 1 of .*'problem' is null"):
        pgzoo.tasks.get("math", path=str(_jsonl(tmp_path, rows, "q.jsonl")))


def test_math_numeric_answers_are_text(tmp_path):
    task = pgzoo.tasks.get("math", path=str(_jsonl(tmp_path, [{"problem": "1+1", "answer": 2},
                                                              {"problem": "1/2", "answer": 0.5}])))
    assert sorted(p.answer for p in task.all_problems()) == ["0.5", "2"]


def test_characters_outside_the_tiny_tokenizer_fail_at_task_load(tmp_path):
    from pgzoo.models.tiny import check_characters

    rows = [{"problem": f"{i}+{i}", "answer": str(2 * i)} for i in range(200)]
    rows[150] = {"problem": "7+7", "answer": "14 ✓"}  # anywhere in the file, either split
    task = pgzoo.tasks.get("math", path=str(_jsonl(tmp_path, rows)))
    with pytest.raises(ConfigError, match=r"line 151 of .*p.jsonl uses character\(s\) '✓'"):
        check_characters(task)
    check_characters(pgzoo.tasks.get("arithmetic", operators="+-*", max_digits=3))  # ASCII: fine
    with pytest.raises(ConfigError, match="uses character"):
        from pgzoo.models.cold_start import ensure_cold_start

        ensure_cold_start("math", {"path": str(tmp_path / "p.jsonl")}, cache_dir=tmp_path / "cache")
