"""`pgzoo compare`: aggregation over seeds and the t-interval against hand-computed values, collapse detection, the
PNG and table, the verdict rules and their power, and the grid runner (finished runs skipped, interrupted runs
resumed, wall times summed)."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest

from pgzoo.cli.main import main
from pgzoo.lab.compare import collapse_step, compare, group_name, read_run
from pgzoo.errors import ConfigError
from pgzoo.lab.grid import GridRun, load_grid, read_walls, run_missing, train_command
from pgzoo.lab.stats import Rule, mean_ci, pilot, power, seeds_needed, t975

REPO = Path(__file__).resolve().parents[1]


def fake_run(root: Path, name: str, seed: int, rewards: list[float], before: float, after: float,
             during: dict[int, float] | None = None, kl: float = 1e-4, gap: float = 0.01,
             recipe: str | None = None) -> Path:
    """A finished run folder with made-up metrics; ``recipe.yaml`` a stub naming group and seed unless ``recipe``
    (the text `pgzoo train` would record) is given."""
    run = root / name
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text(recipe or f"name: {group_name(name)}\nseed: {seed}\n")
    (run / "summary.json").write_text(json.dumps({"steps": len(rewards), "seconds": 40.0 + seed}))
    evals = {"before": {"greedy_accuracy": 0.1, "avg@4": before}, "after": {"greedy_accuracy": 0.2, "avg@4": after}}
    if during:
        evals["during"] = {str(k): {"avg@4": v} for k, v in during.items()}
    (run / "eval.json").write_text(json.dumps(evals))
    lines = ["step,reward/mean,entropy/mean,kl/train_inference_k1,first_order/gap_total,eval/avg@4"]
    lines += [f"{i},{r},{0.5 - 0.01 * i},{kl},{gap * (1 + i)}," for i, r in enumerate(rewards)]
    lines += [f"{k - 1},,,,,{v}" for k, v in (during or {}).items()]  # periodic evaluation logs its own row
    (run / "metrics.csv").write_text("\n".join(lines) + "\n")
    return run


def test_t_quantiles_and_mean_ci_by_hand():
    assert t975(1) == pytest.approx(12.7062) and t975(2) == pytest.approx(4.3027) and t975(100) == 1.96
    mean, half = mean_ci([0.5, 0.6, 0.9])
    # mean 2/3; s^2 = (0.02778 + 0.00444 + 0.05444) / 2 = 0.043333; half = 4.3027 * sqrt(0.043333 / 3)
    assert mean == pytest.approx(2 / 3) and half == pytest.approx(4.3027 * math.sqrt(0.043333333 / 3), rel=1e-6)
    assert half == pytest.approx(0.517121, abs=1e-6)
    assert mean_ci([0.4]) == (0.4, None)
    m, h = mean_ci([0.5, 0.7])
    assert m == pytest.approx(0.6) and h == pytest.approx(12.7062 * 0.1, rel=1e-9)  # s = 0.1414, s/sqrt(2) = 0.1
    with pytest.raises(ConfigError, match="two seeds"):
        t975(0)


def test_collapse_step():
    flat = {i: 0.5 for i in range(12)}
    assert collapse_step(flat) is None
    drop = dict(enumerate([0.5] * 6 + [0.4, 0.1, 0.1, 0.1, 0.1, 0.1]))
    assert collapse_step(drop) == 9  # steps 5..9 average 0.24 < 0.5 * 0.5
    assert collapse_step(dict(enumerate([0.5] * 6))) is None  # too short to tell


def test_two_fake_runs_aggregate_table_and_png(tmp_path):
    runs = tmp_path / "runs"
    rewards = [0.2 + 0.02 * i for i in range(12)]
    a0 = fake_run(runs, "minirl-s0", 0, rewards, before=0.3, after=0.5, during={4: 0.35, 8: 0.45})
    a1 = fake_run(runs, "minirl-s1", 1, [r + 0.1 for r in rewards], before=0.3, after=0.7, during={4: 0.45, 8: 0.55})
    b0 = fake_run(runs, "noclip-s0", 0, [0.5] * 6 + [0.1] * 6, before=0.3, after=0.2, kl=3e-4, gap=0.1)
    table, png = compare([a0, a1, b0], tmp_path / "cmp")
    assert png.is_file() and png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    lines = table.splitlines()
    assert lines[2].startswith("| minirl | 2 | **0.600** ± 1.271 (avg@4) | 0.300 | +0.300 ± 1.271 |")
    assert lines[2].endswith("| 1.0e-04 | 0.12 | 0/2 | 40 |")  # mean KL, max gap (0.01 x 12), collapses, wall
    assert lines[3].startswith("| noclip | 1 | **0.200** (avg@4) | 0.300 | -0.100 |") and "| 1/1 (9) |" in lines[3]
    summary = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert summary[0]["wall_mean_s"] == pytest.approx(40.5) and summary[1]["gap_max"] == pytest.approx(1.2)
    assert (tmp_path / "cmp" / "compare.md").read_text().strip() == table
    # the held-out curve: before at 0, during at 4 and 8, after at the last step + 1, averaged over the seeds
    run = read_run(a0)
    assert run.heldout_series() == {0: 0.3, 4: 0.35, 8: 0.45, 12: 0.5}
    from pgzoo.lab.compare import group_runs

    g = group_runs([read_run(a0), read_run(a1)])[0]
    steps, mean, lo, hi = g.curve("heldout")
    assert steps == [0, 4, 8, 12] and mean == pytest.approx([0.3, 0.4, 0.5, 0.6]) and lo[1] == 0.35 and hi[1] == 0.45
    steps, mean, _, _ = g.curve("reward/mean")
    assert mean[0] == pytest.approx(0.25) and len(steps) == 12


def test_paired_differences_by_hand(tmp_path, capsys):
    """A − B seed by seed: seeds whose cold starts differ (0.3 vs 0.6 final level) cancel in the difference."""
    from pgzoo.lab.compare import Comparison, group_runs, paired, paired_markdown

    runs = tmp_path / "runs"
    a = [fake_run(runs, f"a-s{s}", s, [0.2] * 3, 0.2, lvl - d) for s, lvl, d in ((0, 0.3, 0.05), (1, 0.6, 0.07),
                                                                                (2, 0.45, 0.03))]
    b = [fake_run(runs, f"b-s{s}", s, [0.2] * 3, 0.2, lvl) for s, lvl in ((0, 0.3), (1, 0.6), (2, 0.45), (3, 0.5))]
    groups = group_runs([read_run(p) for p in a + b])
    p = paired(groups, Comparison("a", "b"))
    # differences -0.05, -0.07, -0.03: mean -0.05, s = 0.02, half = 4.3027 * 0.02 / sqrt(3) (seed 3 has no pair)
    assert p["seeds"] == 3 and p["diffs"] == pytest.approx([-0.05, -0.07, -0.03])
    assert p["mean"] == pytest.approx(-0.05) and p["ci95"] == pytest.approx(4.3027 * 0.02 / math.sqrt(3), rel=1e-6)
    # the unpaired intervals of the finals overlap widely; the paired one excludes 0
    table = paired_markdown(groups, [Comparison("a", "b", "(x)", Rule("less"), "a is worse"),
                                     Comparison("a", "zzz", "(y)", Rule("greater"))])
    assert ("| (x) | a − b | 3 | -0.050, -0.070, -0.030 | -0.050 ± 0.050 | [-0.100, -0.000] | A < B | "
            "**reproduced** | a is worse |") in table
    assert "| (y) | a − zzz | 0 | – | – | not run: zzz | A > B | undecided |" in table
    assert main(["compare", *map(str, a + b), "--pair", "a", "b", "--out", str(tmp_path / "o")]) == 0
    assert "-0.050 ± 0.050 | [-0.100, -0.000] | – | – |" in capsys.readouterr().out  # --pair: no rule, no verdict
    assert json.loads((tmp_path / "o" / "compare.json").read_text())[-1]["paired"][0]["seeds"] == 3


def test_verdicts_by_the_rules():
    """Each rule on intervals on either side of 0 and of the margin; one seed is never decided."""
    less, greater, eq = Rule("less"), Rule("greater"), Rule("equivalent", 0.03)
    assert [less.verdict(m, 0.05) for m in (-0.06, 0.0, 0.06)] == ["reproduced", "undecided", "not reproduced"]
    assert [greater.verdict(m, 0.05) for m in (-0.06, 0.0, 0.06)] == ["not reproduced", "undecided", "reproduced"]
    # equivalent: inside (-0.03, 0.03) / straddling a bound / entirely beyond one
    assert [eq.verdict(m, h) for m, h in ((0.01, 0.015), (-0.01, 0.015), (0.02, 0.015), (0.05, 0.02), (-0.05, 0.02))] \
        == ["reproduced", "reproduced", "undecided", "not reproduced", "not reproduced"]
    assert less.verdict(-0.5, None) == "undecided" and eq.verdict(math.nan, None) == "undecided"
    assert (str(less), str(greater), str(eq)) == ("A < B", "A > B", "A ≈ B ± 0.03")
    for bad, match in ((("lesser",), "expect='lesser'"), (("equivalent",), "needs a margin"),
                       (("equivalent", 1.5), "margin=1.5"), (("less", 0.03), "only expect: equivalent")):
        with pytest.raises(ConfigError, match=match):
            Rule(*bad)


def test_power_against_the_noncentral_t_and_an_independent_simulation():
    """Paired t, two-sided 95%, effect = 1 sd: 10 seeds give power 0.8031 (the noncentral t; the usual table's
    n = 10 for d_z = 1), which the simulation reproduces; seeds_needed stops at the first n reaching the target."""
    import random
    import statistics

    assert power(1.0, 1.0, 10, Rule("greater")) == pytest.approx(0.8031, abs=0.012)
    assert power(-1.0, 1.0, 10, Rule("less")) == pytest.approx(0.8031, abs=0.012)
    assert power(-1.0, 1.0, 10, Rule("greater")) < 0.001  # the wrong direction is never "reproduced"
    n = seeds_needed(1.0, 1.0, Rule("greater"), sims=4000)
    assert n in (9, 10, 11) and power(1.0, 1.0, n - 1, Rule("greater"), sims=4000) < 0.8
    # equivalence, against a plain-Python simulation of the same rule (another generator, statistics.stdev)
    rule, rng, hits = Rule("equivalent", 0.03), random.Random(7), 0
    for _ in range(4000):
        d = [rng.gauss(0.005, 0.02) for _ in range(6)]
        half = t975(5) * statistics.stdev(d) / math.sqrt(6)
        hits += -0.03 < statistics.fmean(d) - half and statistics.fmean(d) + half < 0.03
    assert power(0.005, 0.02, 6, rule) == pytest.approx(hits / 4000, abs=0.03)
    assert pilot([-0.05, -0.07, -0.03]) == pytest.approx((-0.05, 0.02))
    with pytest.raises(ConfigError, match="at least 2 seeds"):
        power(0.1, 0.1, 1, rule)
    with pytest.raises(ConfigError, match="positive standard deviation"):
        power(0.1, 0.0, 4, rule)


def test_grid_comparisons_are_checked(tmp_path):
    grid = load_grid(REPO / "recipes" / "lab" / "grid.yaml")
    assert [(c.label, c.a, c.b, c.rule) for c in grid.comparisons][2:4] == [
        ("(c)", "minirl-r3", "minirl", Rule("equivalent", 0.03)),
        ("(d)", "offpolicy-n8-minirl-no-clip", "offpolicy-n8-minirl-r2", Rule("less"))]
    import shutil

    lab = shutil.copytree(REPO / "recipes" / "lab", tmp_path / "lab")
    text = (lab / "grid.yaml").read_text()
    for bad, match in (("{a: minirl, b: nope, expect: less}", "comparisons\\[0\\].b='nope' is not a recipe"),
                       ("{a: minirl, b: minirl-r3}", "comparisons\\[0\\] must be a mapping with keys a, b"),
                       ("[1, 2]", "must be a mapping"),
                       ("{a: minirl, b: minirl-r3, expect: lesser}", "comparisons\\[0\\].expect='lesser'.*'less'"),
                       ("{a: minirl, b: minirl-r3, expect: less, marign: 0.1}",
                        "comparisons\\[0\\].marign: unknown key. Did you mean 'margin'"),
                       ("{a: minirl, b: minirl-r3, expect: equivalent}", "comparisons\\[0\\]: expect: equivalent "
                                                                        "needs a margin"),
                       ("{a: minirl, b: minirl-r3, expect: equivalent, margin: 1.5}",
                        "comparisons\\[0\\].margin=1.5"),
                       ("{a: minirl, b: minirl-r3, expect: less, margin: 0.03}",
                        "comparisons\\[0\\].margin=0.03: only expect: equivalent"),
                       ("{a: minirl, b: minirl-r3, expect: less, claim: 3}", "comparisons\\[0\\].claim=3"),
                       ("{a: minirl, b: minirl-r3, expcet: less}", "comparisons\\[0\\].expcet: .*'expect'")):
        (lab / "grid.yaml").write_text(text.split("comparisons:")[0] + f"comparisons:\n  - {bad}\n")
        with pytest.raises(ConfigError, match=match):
            load_grid(lab / "grid.yaml")


def test_cli_compares_folders_and_rejects_bad_input(tmp_path, capsys):
    a = fake_run(tmp_path, "x-s0", 0, [0.1] * 3, 0.2, 0.3)
    assert main(["compare", str(a), "--out", str(tmp_path / "o")]) == 0
    assert "| x | 1 | **0.300**" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert main(["compare", str(tmp_path / "empty")]) == 2
    assert "not a run folder" in capsys.readouterr().err
    assert main(["compare"]) == 2


def test_asynchronous_grid_is_the_pre_registered_design():
    """Finding (g) as docs/lab.md fixed it: MiniRL + R2, + R3, and without clipping (R2), at k = 1, 2, 4, the lab's
    reference otherwise (same cold start, task, rollouts, 48 steps, one mini-batch), 8 seeds, four comparisons."""
    from pgzoo.recipes import load_recipe

    grid = load_grid("lab/grid-async")
    reference = load_recipe(REPO / "recipes" / "lab" / "minirl.yaml")
    assert grid.seeds == list(range(8)) and len(grid.recipes) == 9
    for path in grid.recipes:
        r = load_recipe(path)
        k, variant = int(r.name.split("-")[1][1:]), r.name.split("minirl-")[1]
        assert r.rollout.max_staleness == k in (1, 2, 4)
        assert r.train.routing_replay == ("R3" if variant == "r3" else "R2")
        assert r.objective.name == ("minirl-no-clip" if variant == "no-clip" else "minirl")
        assert (r.model, r.task, r.train.steps, r.train.num_minibatches) == (
            reference.model, reference.task, 48, 1)
        assert r.rollout.model_copy(update={"max_staleness": 0}) == reference.rollout
    assert [(c.a, c.b, c.rule) for c in grid.comparisons] == [
        ("async-k2-minirl-no-clip", "async-k2-minirl-r2", Rule("less")),
        ("async-k4-minirl-no-clip", "async-k4-minirl-r2", Rule("less")),
        ("async-k4-minirl-r3", "async-k4-minirl-r2", Rule("greater")),
        ("async-k1-minirl-r3", "async-k1-minirl-r2", Rule("equivalent", 0.03))]


def test_grid_file_and_runs(tmp_path):
    grid = load_grid(REPO / "recipes" / "lab" / "grid.yaml")
    assert grid.seeds == list(range(8)) and len(grid.recipes) == 12 and all(Path(r).is_file() for r in grid.recipes)
    assert load_grid("lab/grid").recipes == grid.recipes  # the shipped copy by name
    runs = grid.runs([0, 1], tmp_path)
    assert len(runs) == 24 and runs[0].name == "minirl-s0" and runs[12].seed == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text("recipes: [tiny/minirl]\nseed: 3\n")
    with pytest.raises(ConfigError, match="unknown: seed"):
        load_grid(bad)
    bad.write_text("recipes: []\n")
    with pytest.raises(ConfigError, match="non-empty list"):
        load_grid(bad)


def test_run_missing_skips_finished_resumes_and_sums_walls(tmp_path):
    from pgzoo.recipes import load_recipe

    sets = ["train.steps=3"]
    done = GridRun("tiny/minirl", 0, tmp_path / "minirl-s0")
    recorded = load_recipe("tiny/minirl", ["seed=0", f"output.dir={done.run_dir}", *sets]).dump()
    fake_run(tmp_path, "minirl-s0", 0, [0.1] * 3, 0.2, 0.3, recipe=recorded)
    todo = GridRun("tiny/minirl", 1, tmp_path / "minirl-s1")
    calls = []

    def runner(cmd, **kw):
        calls.append(cmd)
        if len(calls) == 1:  # the first attempt is interrupted after a checkpoint
            (todo.run_dir / "checkpoints").mkdir(parents=True)
            return -15
        (todo.run_dir / "summary.json").write_text("{}")
        return 0

    failed = run_missing([done, todo], sets, runner=runner, log=lambda m: None)
    assert failed == [todo] and len(calls) == 1
    assert calls[0][-2:] == ["--resume", "--quiet"] and f"output.dir={todo.run_dir}" in calls[0] and "seed=1" in calls[0]
    log = []
    assert run_missing([done, todo], sets, runner=runner, log=log.append) == []
    assert "train.steps=3" in calls[1] and any("resume minirl-s1" in m for m in log)
    assert any("skip minirl-s0" in m for m in log)
    assert set(read_walls(tmp_path)) == {"minirl-s1"}  # one entry, summed over both attempts
    assert run_missing([done, todo], sets, runner=runner, log=lambda m: None) == [] and len(calls) == 2


def test_train_command_runs_pgzoo_train():
    cmd = train_command(GridRun("lab/minirl", 2, Path("out/minirl-s2")), ["train.steps=2"])
    assert cmd[1:4] == ["-m", "pgzoo", "train"] and cmd[4:] == [
        "lab/minirl", "seed=2", "output.dir=out/minirl-s2", "train.steps=2", "--resume", "--quiet"]
    out = subprocess.run([cmd[0], "-m", "pgzoo", "train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--resume" in out.stdout
