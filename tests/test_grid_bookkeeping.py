"""`pgzoo compare`'s bookkeeping: a run folder's state is explicit (running / finished / stopped / failed), a grid
resumes whatever is not finished, refuses a changed recipe for an existing run, refuses duplicates and collisions up
front, checks `--pair` names, and turns unreadable inputs into errors naming the file."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
from pgzoo.models import fresh_tiny_checkpoint
from _train_helpers import subprocess_env, train_steps, wait_for
from pgzoo.adapters.lightning.run_folder import (
    read_metrics,
    recorded_status,
    run_state,
    write_status,
)
from pgzoo.adapters.lightning.signals import Interrupted
from test_compare import fake_run

from pgzoo.cli.main import main
from pgzoo.errors import ConfigError
from pgzoo.lab.compare import compare
from pgzoo.lab.grid import GridRun, check_recorded, load_grid, run_missing
from pgzoo.recipes import load_recipe


# ---------------------------------------------------------------------------------------------- the run's state
def test_recorded_status_follows_the_run(tmp_path):
    with recorded_status(tmp_path):
        assert run_state(tmp_path) == "running"
    assert run_state(tmp_path) == "finished"
    with pytest.raises(Interrupted), recorded_status(tmp_path):
        raise Interrupted("stopped by SIGTERM", signal.SIGTERM)
    assert run_state(tmp_path) == "stopped"
    with pytest.raises(KeyboardInterrupt), recorded_status(tmp_path):
        raise KeyboardInterrupt
    assert run_state(tmp_path) == "stopped"
    with pytest.raises(ConfigError), recorded_status(tmp_path):
        raise ConfigError("engine died")
    assert run_state(tmp_path) == "failed"
    assert "engine died" in json.loads((tmp_path / "status.json").read_text())["error"]
    with recorded_status(tmp_path, enabled=False):  # ranks other than 0 write nothing
        pass
    assert run_state(tmp_path) == "failed"


def test_run_state_of_folders_without_status(tmp_path):
    assert run_state(tmp_path) is None
    (tmp_path / "summary.json").write_text(json.dumps({"steps": 4}))
    assert run_state(tmp_path) == "finished"
    (tmp_path / "summary.json").write_text(json.dumps({"steps": 2, "interrupted": "SIGTERM"}))
    assert run_state(tmp_path) == "stopped"
    (tmp_path / "status.json").write_text("{garbled")  # unreadable: fall back to the summary, never "finished" by luck
    assert run_state(tmp_path) == "stopped"
    write_status(tmp_path, "running")
    assert run_state(tmp_path) == "running"
    with pytest.raises(ValueError):
        write_status(tmp_path, "done")


def test_write_status_never_masks_the_real_error(tmp_path):
    target = tmp_path / "a-file"
    target.write_text("")
    write_status(target, "failed")  # the run folder is a file: nothing written, nothing raised


@pytest.mark.parametrize("state", ["stopped", "failed", "running"])
def test_grid_resumes_every_run_that_is_not_finished(tmp_path, state):
    run = GridRun("tiny/minirl", 0, tmp_path / "minirl-s0")
    fake_run(tmp_path, "minirl-s0", 0, [0.1] * 2, 0.2, 0.3,
             recipe=load_recipe("tiny/minirl", ["seed=0", f"output.dir={run.run_dir}"]).dump())
    (run.run_dir / "checkpoints").mkdir()
    write_status(run.run_dir, state)  # fake_run wrote summary.json: the state decides, not its presence
    assert not run.finished
    calls = []

    def runner(cmd, **kw):
        calls.append(cmd)
        write_status(run.run_dir, "finished")
        return 0

    log = []
    assert run_missing([run], runner=runner, log=log.append) == []
    assert len(calls) == 1 and any(f"resume ({state}) minirl-s0" in m for m in log)
    assert run.finished


def test_after_run_hears_each_finished_run_only(tmp_path):
    ok, bad = GridRun("tiny/minirl", 0, tmp_path / "minirl-s0"), GridRun("tiny/minirl", 1, tmp_path / "minirl-s1")

    def runner(cmd, **kw):
        if "seed=0" in cmd:
            ok.run_dir.mkdir()
            write_status(ok.run_dir, "finished")
            return 0
        return 1

    heard = []
    assert run_missing([ok, bad], runner=runner, log=lambda m: None, after_run=heard.append) == [bad]
    assert heard == [ok]


def test_jobs_train_runs_at_once_in_order_with_one_bookkeeper(tmp_path):
    """--jobs 2: two runs are in their runner at the same time (a barrier only two concurrent runs pass), the runs
    start in the grid's order, after_run is never entered twice at once, and the failed runs come back in order."""
    import threading
    import time

    runs = [GridRun("tiny/minirl", s, tmp_path / f"minirl-s{s}") for s in range(4)]
    both = threading.Barrier(2, timeout=20)
    started, inside, heard = [], [0], []

    def runner(cmd, **kw):
        seed = int(next(c for c in cmd if c.startswith("seed="))[5:])
        started.append(seed)
        both.wait()  # runs 0 and 1 meet here, then 2 and 3: with one job at a time this times out
        if seed % 2:
            return 1
        runs[seed].run_dir.mkdir()
        write_status(runs[seed].run_dir, "finished")
        return 0

    def after_run(run):
        inside[0] += 1
        assert inside[0] == 1, "after_run entered twice at once"
        time.sleep(0.05)
        heard.append(run.seed)
        inside[0] -= 1

    assert run_missing(runs, runner=runner, log=lambda m: None, after_run=after_run, jobs=2) == [runs[1], runs[3]]
    assert sorted(started[:2]) == [0, 1] and sorted(started[2:]) == [2, 3]
    assert sorted(heard) == [0, 2]
    with pytest.raises(threading.BrokenBarrierError):
        both.reset()
        run_missing([GridRun("tiny/minirl", 5, tmp_path / "minirl-s5"), GridRun("tiny/minirl", 6, tmp_path / "m6")],
                    runner=lambda cmd, **kw: both.wait(timeout=0.5), log=lambda m: None, jobs=1)


@pytest.mark.parametrize("jobs", [0, -1, 1.0, "2", True])
def test_jobs_is_a_positive_int(tmp_path, jobs):
    with pytest.raises(ConfigError, match="--jobs"):
        run_missing([], runner=lambda *a, **k: 0, log=lambda m: None, jobs=jobs)


def test_cli_jobs_needs_a_grid_and_a_positive_count(tmp_path, capsys):
    grid = grid_file(tmp_path, "[a/minirl.yaml, a/other.yaml]")
    assert main(["compare", "--grid", str(grid), "--jobs", "0", "--out", str(tmp_path / "o"), "--no-run"]) == 2
    assert "--jobs 0" in capsys.readouterr().err
    assert main(["compare", str(tmp_path), "--jobs", "2"]) == 2
    assert "only with --grid" in capsys.readouterr().err


def test_a_run_training_in_another_live_process_is_skipped_not_resumed_beside_it(tmp_path):
    """Two grids over one folder: a run whose status says running in a live pgzoo process is left to it; once that
    process is gone (or the id belongs to a process that is not pgzoo's) the run is resumed."""
    run = GridRun("tiny/minirl", 0, tmp_path / "minirl-s0")
    run.run_dir.mkdir()
    calls, log = [], []

    def runner(cmd, **kw):
        calls.append(cmd)
        write_status(run.run_dir, "finished")
        return 0

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "pgzoo", "train"])
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        write_status(run.run_dir, "running", pid=other.pid)
        assert run_missing([run], runner=runner, log=log.append) == [] and calls == []
        assert any(f"skip minirl-s0: running in process {other.pid}" in m for m in log)
        write_status(run.run_dir, "running", pid=stranger.pid)  # an id reused by a process that is not a run
        assert run_missing([run], runner=runner, log=log.append) == [] and len(calls) == 1
        write_status(run.run_dir, "running", pid=other.pid)
        other.kill()
        other.wait()
        assert run_missing([run], runner=runner, log=log.append) == [] and len(calls) == 2
    finally:
        for p in (other, stranger):
            p.kill()
            p.wait()


# ---------------------------------------------------------------------------------------------- verdicts, records
def test_grid_verdicts_and_records_from_synthetic_runs(tmp_path, capsys):
    """`pgzoo compare --grid --no-run --record`: each comparison's verdict by its grid rule, the per-run CSV and the
    walls, in the run folder and in the record folder (what docs/results keeps)."""
    grid = tmp_path / "grid.yaml"
    grid.write_text("recipes: [tiny/minirl, tiny/minirl-no-is, tiny/minirl-r3, tiny/minirl-length-norm]\n"
                    "seeds: [0, 1, 2]\ncomparisons:\n"
                    "  - {label: '(a)', a: minirl-no-is, b: minirl, expect: less, claim: IS helps}\n"
                    "  - {label: '(c)', a: minirl-r3, b: minirl, expect: equivalent, margin: 0.03}\n"
                    "  - {label: '(x)', a: minirl-r3, b: minirl-no-is, expect: less}\n"
                    "  - {label: '(b)', a: minirl-length-norm, b: minirl, expect: less}\n")  # not run yet
    out = tmp_path / "runs"
    for s, level in ((0, 0.40), (1, 0.55), (2, 0.50)):  # seed levels differ; the paired differences do not
        fake_run(out, f"minirl-s{s}", s, [0.2] * 3, 0.3, level)
        fake_run(out, f"minirl-no-is-s{s}", s, [0.2] * 3, 0.3, level - 0.10 - 0.01 * s)
        fake_run(out, f"minirl-r3-s{s}", s, [0.2] * 3, 0.3, level + 0.005 * (s - 1))
    (out / "walls.json").write_text(json.dumps({"minirl-s0": 61.0}))
    record = tmp_path / "docs" / "results"
    assert main(["compare", "--grid", str(grid), "--out", str(out), "--no-run", "--record", str(record)]) == 0
    printed = capsys.readouterr().out
    # (a): -0.10, -0.11, -0.12 -> [-0.135, -0.085]: below 0; (c): -0.005, 0, +0.005 -> inside ±0.03;
    # (x): +0.105, +0.115, +0.125 -> above 0, the opposite of "less"
    assert "| (a) | minirl-no-is − minirl | 3 | -0.100, -0.110, -0.120 | -0.110 ± 0.025 | [-0.135, -0.085] | A < B " \
           "| **reproduced** | IS helps |" in printed
    assert "| A ≈ B ± 0.03 | **reproduced** |" in printed and "| A < B | not reproduced |" in printed
    assert "| not run: minirl-length-norm | A < B | undecided |" in printed  # a partial grid is compared too
    for folder in (out, record):
        assert (folder / "compare.md").read_text().strip() in printed
        verdicts = [p["verdict"] for p in json.loads((folder / "compare.json").read_text())[-1]["paired"]]
        assert verdicts == ["reproduced", "reproduced", "not reproduced", "undecided"]
        rows = (folder / "runs.csv").read_text().splitlines()
        assert rows[0].startswith("recipe,seed,steps,metric,before,after") and len(rows) == 10
        assert rows[1] == "minirl,0,3,avg@4,0.3,0.4,0.0001,0.03,,61"
    assert json.loads((record / "walls.json").read_text()) == {"minirl-s0": 61.0}
    assert not (record / "compare.png").exists() and (out / "compare.png").is_file()  # the record is text only


# ---------------------------------------------------------------------------------------------- changed recipes
def test_a_finished_grid_with_changed_overrides_is_refused(tmp_path):
    run = GridRun("tiny/minirl", 0, tmp_path / "minirl-s0")
    fake_run(tmp_path, "minirl-s0", 0, [0.1] * 2, 0.2, 0.3,
             recipe=load_recipe("tiny/minirl", ["seed=0", f"output.dir={run.run_dir}", "train.steps=3"]).dump())
    check_recorded([run], ["train.steps=3"])  # the same setting: fine
    with pytest.raises(ConfigError, match=r"changed: train.lr, train.steps\).*new --out"):
        check_recorded([run], ["train.steps=5", "train.lr=0.1"])
    with pytest.raises(ConfigError, match="changed: train.steps"):
        run_missing([run], [], runner=lambda *a, **k: pytest.fail("nothing may run"), log=lambda m: None)
    (run.run_dir / "recipe.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="recipe.yaml: not valid YAML"):
        check_recorded([run], ["train.steps=3"])


# ---------------------------------------------------------------------------------------------- duplicates
def grid_file(tmp_path, recipes: str, seeds: str = "[0]"):
    (tmp_path / "a").mkdir(exist_ok=True)
    (tmp_path / "b").mkdir(exist_ok=True)
    minirl = load_recipe("tiny/minirl").dump()
    (tmp_path / "a" / "minirl.yaml").write_text(minirl)
    (tmp_path / "b" / "minirl.yaml").write_text(minirl)
    (tmp_path / "a" / "other.yaml").write_text(minirl)
    path = tmp_path / "grid.yaml"
    path.write_text(f"recipes: {recipes}\nseeds: {seeds}\n")
    return path


@pytest.mark.parametrize("recipes, seeds, match", [
    ("[a/minirl.yaml, b/minirl.yaml]", "[0]", "names 2 recipes"),
    ("[a/minirl.yaml, a/minirl.yaml]", "[0]", "is listed twice"),
    ("[a/minirl.yaml]", "[0, 1, 0]", "seed 0 is given twice"),
    ("[a/minirl.yaml]", "[-1]", "seed -1 is negative"),
    ("[a/minirl.yaml]", "[true]", "list of integers"),
])
def test_duplicates_and_collisions_are_refused_up_front(tmp_path, recipes, seeds, match):
    with pytest.raises(ConfigError, match=match):
        load_grid(grid_file(tmp_path, recipes, seeds))


def test_cli_seeds_are_checked_like_the_grids(tmp_path, capsys):
    grid = grid_file(tmp_path, "[a/minirl.yaml, a/other.yaml]")
    assert main(["compare", "--grid", str(grid), "--seeds", "1", "1", "--out", str(tmp_path / "o"), "--no-run"]) == 2
    assert "seed 1 is given twice" in capsys.readouterr().err
    assert main(["compare", "--grid", str(grid), "--seeds", "-2", "--out", str(tmp_path / "o"), "--no-run"]) == 2
    assert "negative" in capsys.readouterr().err


def test_the_same_run_given_twice_is_refused(tmp_path):
    a = fake_run(tmp_path / "x", "a-s0", 0, [0.1] * 2, 0.2, 0.3)
    b = fake_run(tmp_path / "y", "a-s0", 0, [0.1] * 2, 0.2, 0.4)  # another folder, same group and seed
    with pytest.raises(ConfigError, match="are the same run"):
        compare([a, b], tmp_path / "o")
    with pytest.raises(ConfigError, match="are the same run"):
        compare([a, a], tmp_path / "o")


# ---------------------------------------------------------------------------------------------- --pair
def test_misspelt_pair_is_an_error_in_both_modes(tmp_path, capsys):
    a = fake_run(tmp_path, "a-s0", 0, [0.1] * 2, 0.2, 0.3)
    b = fake_run(tmp_path, "b-s0", 0, [0.1] * 2, 0.2, 0.3)
    assert main(["compare", str(a), str(b), "--pair", "a", "bb", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "'bb' is not a group" in err and "Did you mean 'b'" in err
    grid = grid_file(tmp_path, "[a/minirl.yaml, a/other.yaml]")
    assert main(["compare", "--grid", str(grid), "--pair", "minirl", "othre", "--out", str(tmp_path / "g")]) == 2
    assert "'othre' is not a group" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()  # refused before any run started


# ---------------------------------------------------------------------------------------------- unreadable inputs
def test_out_naming_a_file_is_an_error(tmp_path, capsys):
    a = fake_run(tmp_path, "a-s0", 0, [0.1] * 2, 0.2, 0.3)
    (tmp_path / "file").write_text("")
    assert main(["compare", str(a), "--out", str(tmp_path / "file")]) == 2
    assert "a file, not a folder" in capsys.readouterr().err
    grid = grid_file(tmp_path, "[a/minirl.yaml]")
    assert main(["compare", "--grid", str(grid), "--out", str(tmp_path / "file"), "--no-run"]) == 2
    assert "a file, not a folder" in capsys.readouterr().err


def test_broken_recipe_and_garbled_metrics_name_the_file(tmp_path, capsys):
    a = fake_run(tmp_path, "a-s0", 0, [0.1] * 2, 0.2, 0.3)
    (a / "recipe.yaml").write_text("seed: [1\n")
    assert main(["compare", str(a), "--out", str(tmp_path / "o")]) == 2
    assert f"{a / 'recipe.yaml'}: not valid YAML" in capsys.readouterr().err
    (a / "recipe.yaml").write_text("- a list\n")
    assert main(["compare", str(a), "--out", str(tmp_path / "o")]) == 2
    assert "not a recipe" in capsys.readouterr().err
    b = fake_run(tmp_path, "b-s0", 0, [0.1] * 2, 0.2, 0.3)
    with (b / "metrics.csv").open("a") as fh:
        fh.write("3,zero point one,,,,\n")
    assert main(["compare", str(b), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{b / 'metrics.csv'} is not a readable metrics file" in err and "zero point one" in err
    (b / "metrics.csv").write_text("step,reward/mean\n0,0.1,0.2,0.3\n")
    with pytest.raises(ConfigError, match="line 2 has 4 cells, the header names 2"):
        read_metrics(b / "metrics.csv")


# ---------------------------------------------------------------------------------------------- a real process
@pytest.mark.slow
def test_a_run_stopped_by_sigterm_is_resumed_by_the_grid_not_skipped(tmp_path):
    """A real `pgzoo train` stopped by SIGTERM writes summary.json but says `stopped`; the grid runner then resumes
    it to the end (a real `pgzoo train --resume` process) and only then reports it finished."""
    ckpt = fresh_tiny_checkpoint(tmp_path / "tiny")
    run = GridRun("tiny/minirl", 0, tmp_path / "grid" / "minirl-s0")
    sets = [f"model.path={ckpt}", "rollout.engine=transformers", "rollout.prompts_per_step=2",
            "rollout.group_size=2", "rollout.max_new_tokens=4", "eval.before=false", "eval.after=false",
            "output.progress_bar=false", "output.plots=false", "output.checkpoint_every=0", "train.steps=10"]
    cmd = [sys.executable, "-m", "pgzoo", "train", "tiny/minirl", "seed=0", f"output.dir={run.run_dir}", *sets,
           "--quiet"]
    proc = subprocess.Popen(cmd, env=subprocess_env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(proc, lambda: len(train_steps(run.run_dir)) >= 2)
        assert run.state == "running"
        proc.send_signal(signal.SIGTERM)
        text = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, text[-3000:]
    assert (run.run_dir / "summary.json").is_file() and run.state == "stopped" and not run.finished
    log = []
    failed = run_missing([run], sets, log=log.append)
    assert failed == [] and run.finished, log
    assert any("resume (stopped) minirl-s0" in m for m in log)
    assert train_steps(run.run_dir) == list(range(10))
