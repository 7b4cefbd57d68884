"""`pgzoo train` / `pgzoo recipe validate` from the command line: plans, one-line errors, a run with a summary."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pgzoo.cli.main import main

from pgzoo.models import fresh_tiny_checkpoint
from _train_helpers import RECIPE, digit_fraction_task, overrides  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_prints_the_plan(capsys):
    assert main(["train", str(RECIPE), "train.num_minibatches=2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "N=2 optimizer step(s)/step of 256 responses" in out
    assert "old logprobs  yes (off-policy N>1)" in out


@pytest.mark.parametrize("args, match", [
    (["train.lrr=1"], "unknown key 'train.lrr'. Did you mean 'train.lr'"),
    (["model.path=/nonexistent/ckpt"], "model.path='/nonexistent/ckpt' does not exist"),
    (["rollout.prompts_per_step=0"], "rollout.prompts_per_step"),
    (["train.num_minibatches=3"], "does not divide"),
    (["train.devices=64"], "CPU processes on a machine with"),
    (["train.devices=3"], "ranks do not divide"),
])
def test_user_mistakes_are_one_line_without_traceback(capsys, args, match):
    assert main(["train", str(RECIPE), *args]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err
    assert err.startswith("pgzoo: error: ") and err.count("\n") == 1


def test_r3_with_vllm_on_cpu_is_rejected(capsys, monkeypatch):
    import pgzoo.rollout.capabilities

    monkeypatch.setattr(pgzoo.rollout.capabilities, "has_cuda", lambda: False)  # vLLM's routes need CUDA
    assert main(["train", str(RECIPE), "train.routing_replay=R3", "--dry-run"]) == 2
    assert "rollout.engine=transformers" in capsys.readouterr().err


def test_console_script_dry_run_in_a_fresh_process():
    proc = subprocess.run([sys.executable, "-m", "pgzoo", "train", "recipes/tiny/minirl.yaml", "--dry-run"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "recipe        minirl" in proc.stdout


def test_recipe_validate_needs_a_file(capsys):
    assert main(["recipe", "validate", "train.lr=1"]) == 2
    assert "at least one recipe file" in capsys.readouterr().err


def test_cli_run_prints_a_summary_table(tmp_path, capsys):
    ckpt = fresh_tiny_checkpoint(tmp_path / "tiny")
    args = [a for a in overrides(ckpt, tmp_path / "run", "train.steps=1") if "progress_bar" not in a]
    assert main(["train", str(RECIPE), *args]) == 0
    out = capsys.readouterr().out
    assert "pgzoo train minirl: 1 steps" in out and "reward/mean" in out
    assert (tmp_path / "run" / "metrics.csv").is_file()


def test_resume_with_allow_change_from_the_command_line(tmp_path, capsys):
    ckpt = fresh_tiny_checkpoint(tmp_path / "tiny")
    out = tmp_path / "run"
    assert main(["train", str(RECIPE), *overrides(ckpt, out, "train.steps=1"), "--quiet"]) == 0
    longer = overrides(ckpt, out, "train.steps=2")
    assert main(["train", str(RECIPE), "--allow-change", "train.steps", *longer]) == 2  # not a resume
    assert "--allow-change only applies with --resume" in capsys.readouterr().err
    assert main(["train", str(RECIPE), "--resume", *longer, "--quiet"]) == 2
    assert "--allow-change train.steps" in capsys.readouterr().err
    assert main(["train", str(RECIPE), "--resume", "--allow-change", "train.steps", *longer, "--quiet"]) == 0
    assert (out / "recipe.resume-step-000001.yaml").is_file()


def test_objectives_lists_every_objective_with_every_default(capsys):
    import dataclasses
    import json

    import pgzoo

    assert main(["objectives"]) == 0
    out = capsys.readouterr().out
    for name in pgzoo.available():
        obj = pgzoo.get(name)
        assert f"\n{name}  ({type(obj).__name__}; " in "\n" + out
        for f in dataclasses.fields(obj.config):
            assert f"{f.name}={getattr(obj.config, f.name)!r}" in out
    assert "advantage estimators" in out and "pass-at-k  (k=1)" in out and "rloo" in out
    assert "reinforce++  (eps=1e-08, gamma=1.0)  per token [N, T]: response_mask\n" in out
    assert main(["objectives", "minirl*", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["name"] for r in rows] == pgzoo.available("minirl*")
    assert rows[0]["defaults"]["is_cap"] == 5.0 and rows[0]["requires"] == ["rollout_logprobs"]
    assert main(["objectives", "minirl-no-clp"]) == 2
    assert "Did you mean 'minirl-no-clip'" in capsys.readouterr().err


def test_train_help_does_not_import_lightning():
    code = ("import sys\nfrom pgzoo.cli.main import main\ntry:\n    main(['train', '--help'])\n"
            "except SystemExit:\n    pass\n"
            "assert 'lightning' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--allow-change KEY" in proc.stdout


@pytest.mark.parametrize("kind, status, prefix", [
    ("SIGINT", 130, "pgzoo: stopped: SIGINT received"),
    ("SIGTERM", 143, "pgzoo: stopped: SIGTERM received"),
    ("ranks", 143, "pgzoo: error: stopped by SIGTERM"),
])
def test_interrupted_runs_exit_with_128_plus_the_signal(monkeypatch, capsys, kind, status, prefix):
    import signal

    import pgzoo.adapters.lightning.run
    from pgzoo.adapters.lightning.distributed import Stopped
    from pgzoo.adapters.lightning.signals import Interrupted

    def interrupted(*a, **k):
        if kind == "ranks":
            raise Stopped("stopped by SIGTERM: another rank failed or the job was cancelled")
        raise Interrupted(f"{kind} received: stopped after step 3 of 9", getattr(signal, kind))

    monkeypatch.setattr(pgzoo.adapters.lightning.run, "train", interrupted)
    assert main(["train", str(RECIPE), "--quiet"]) == status
    assert capsys.readouterr().err.startswith(prefix)
