"""The run folder under faults and bad input, in process: resume rebuilds metrics.csv from the checkpoint's history
and removes what a killed write left, a damaged newest checkpoint falls back to the newest intact one, a changed
recipe is refused on resume unless allowed, a full disk or an unusable output.dir is a pgzoo error that says which
checkpoint is intact, the `train.stop_on` guards stop a diverged run, and `train.threads` sizes torch's pool."""

from __future__ import annotations

import errno
import json
import math
import pathlib
from types import SimpleNamespace

import pytest
import torch

import pgzoo.adapters.lightning.run as train_mod
from pgzoo.adapters.lightning.guards import Diverged, check_step
from pgzoo.errors import ConfigError, PgzooError
from pgzoo.recipes import load_recipe

from pgzoo.models import fresh_tiny_checkpoint
from _train_helpers import (RECIPE, digit_fraction_task, overrides,  # noqa: F401
                            poison_grad_norm, train_steps)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return fresh_tiny_checkpoint(tmp_path_factory.mktemp("fresh") / "tiny")


def recipe(ckpt, out, *extra):
    return load_recipe(RECIPE, overrides(ckpt, out, *extra))


def test_resume_rebuilds_metrics_from_the_checkpoint_and_cleans_stale_writes(ckpt, tmp_path):
    out = tmp_path / "run"
    r = recipe(ckpt, out, "train.steps=4", "output.checkpoint_every=2", "output.keep_checkpoints=5")
    train_mod.train(r, quiet=True)
    assert train_steps(out) == [0, 1, 2, 3]
    assert json.loads((out / "checkpoints" / "step-000002" / "MANIFEST.json").read_text())["files"]
    # a kill right after the checkpoint of step 1: the newer checkpoint never landed, a write was cut half-way and
    # metrics.csv lost rows (a buffered logger) -- the checkpoint's own history has them all
    import shutil

    shutil.rmtree(out / "checkpoints" / "step-000004")
    stale = out / "checkpoints" / ".step-000004.tmp.abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    lines = (out / "metrics.csv").read_text().splitlines()
    (out / "metrics.csv").write_text("\n".join(lines[:2]) + "\n")  # header + step 0 only
    res = train_mod.train(r, resume=True, quiet=True)
    assert not stale.exists()
    assert train_steps(out) == [0, 1, 2, 3]
    assert [h["step"] for h in res.history] == [0, 1, 2, 3]
    assert json.loads((out / "summary.json").read_text())["steps"] == 4


def test_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(ckpt, tmp_path, capsys):
    out = tmp_path / "run"
    r = recipe(ckpt, out, "train.steps=4", "output.checkpoint_every=2")
    train_mod.train(r, quiet=True)
    weights = out / "checkpoints" / "step-000004" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF  # one flipped byte: same size, the checksum differs
    weights.write_bytes(bytes(data))
    capsys.readouterr()
    res = train_mod.train(r, resume=True)
    said = capsys.readouterr().out
    assert "step-000004 is damaged (model.safetensors does not match its checksum)" in said
    assert "resuming from step-000002, the newest intact checkpoint" in said
    assert (out / "checkpoints" / "damaged-step-000004").is_dir()
    assert res.checkpoint.name == "step-000004" and train_steps(out) == [0, 1, 2, 3]
    # every checkpoint damaged: refused, naming each
    for name in ("step-000002", "step-000004"):
        (out / "checkpoints" / name / "model.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(ConfigError, match=r"no intact checkpoint in .*step-000004 \(.*step-000002 \("):
        train_mod.train(r, resume=True, quiet=True)


def test_resume_with_a_changed_recipe_is_refused_unless_allowed(ckpt, tmp_path):
    out = tmp_path / "run"
    train_mod.train(recipe(ckpt, out, "train.steps=2"), quiet=True)
    original = (out / "recipe.yaml").read_text()
    with pytest.raises(ConfigError, match=r"differs from the one .*step-000002.*train\.lr: 0\.003 -> 0\.01.*"
                                          r"recipe\.yaml"):
        train_mod.train(recipe(ckpt, out, "train.steps=2", "train.lr=1e-2"), resume=True, quiet=True)
    longer = recipe(ckpt, out, "train.steps=3")
    with pytest.raises(ConfigError, match=r"train\.steps: 2 -> 3.*--allow-change train\.steps"):
        train_mod.train(longer, resume=True, quiet=True)
    with pytest.raises(ConfigError, match="train.lr: not a key a resumed run may change"):
        train_mod.train(longer, resume=True, quiet=True, allow_change=["train.lr"])
    res = train_mod.train(longer, resume=True, quiet=True, allow_change=["train.steps"])
    assert [h["step"] for h in res.history] == [0, 1, 2]
    assert (out / "recipe.yaml").read_text() == original  # never overwritten with a different recipe
    kept = load_recipe(out / "recipe.resume-step-000002.yaml")
    assert kept.train.steps == 3


def test_full_disk_while_checkpointing_names_the_intact_checkpoint(ckpt, tmp_path, monkeypatch):
    from pgzoo.adapters.lightning import checkpoint as ck

    real, calls = ck._save_hf, []

    def full_disk(module, folder, state_dict, **kw):
        calls.append(folder)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(module, folder, state_dict, **kw)

    monkeypatch.setattr(ck, "_save_hf", full_disk)
    out = tmp_path / "run"
    with pytest.raises(PgzooError, match=r"could not write the checkpoint of step 3 .*No space left on device.*disk "
                                         r"is full.*step-000002\) is intact; continue with: pgzoo train x\.yaml "
                                         r"--resume"):
        train_mod.train(recipe(ckpt, out, "train.steps=6", "output.checkpoint_every=2"), quiet=True,
                        command="pgzoo train x.yaml")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]  # no half-written folder


def test_output_dir_that_is_a_file_or_not_writable(ckpt, tmp_path, monkeypatch):
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(ConfigError, match=r"output\.dir='.*file' is a file, not a folder; set output\.dir"):
        train_mod.train(recipe(ckpt, afile, "train.steps=1"), quiet=True)
    with pytest.raises(ConfigError, match=r"output\.dir='.*file/run' cannot be written to \(Not a directory\)"):
        train_mod.train(recipe(ckpt, afile / "run", "train.steps=1"), quiet=True)
    real = pathlib.Path.write_text

    def read_only(self, *a, **k):  # as root a chmod does not stop writes: simulate a read-only mount
        if self.name == ".pgzoo-write-test":
            raise OSError(errno.EROFS, "Read-only file system")
        return real(self, *a, **k)

    monkeypatch.setattr(pathlib.Path, "write_text", read_only)
    with pytest.raises(ConfigError, match=r"cannot be written to \(Read-only file system\)"):
        train_mod.train(recipe(ckpt, tmp_path / "ro", "train.steps=1"), quiet=True)


def _stop_on(**kw):
    return SimpleNamespace(**{"nonfinite": True, "entropy_below": 1e-4, "entropy_uniform": 0.999, **kw})


@pytest.mark.parametrize("row, match", [
    ({"loss": math.nan, "grad_norm": 1.0}, r"step 5: loss=nan \(train.stop_on.nonfinite\)"),
    ({"loss": 0.1, "grad_norm": math.inf}, r"grad_norm=inf"),
    ({"entropy/mean": 1e-6}, r"fell below train.stop_on.entropy_below=0.0001 .*deterministic"),
    ({"entropy/mean": math.log(100) * 0.9999}, r"0.9999 of ln\(vocabulary\).*collapsed to uniform"),
])
def test_guard_trips(row, match):
    with pytest.raises(Diverged, match=match):
        check_step(row, _stop_on(), 5, 100)


def test_guard_relaxed_and_healthy_rows_pass():
    check_step({"loss": math.nan, "entropy/mean": 0.0}, _stop_on(nonfinite=False, entropy_below=None), 1, 100)
    check_step({"entropy/mean": math.log(100)}, _stop_on(entropy_uniform=None), 1, 100)
    check_step({"loss": 0.1, "grad_norm": 2.0, "entropy/mean": 4.576}, _stop_on(), 1, 100)  # a random init


def test_diverged_run_stops_with_the_checkpoint_before_it_intact(ckpt, tmp_path, monkeypatch):
    poison_grad_norm(monkeypatch, from_step=2)
    out = tmp_path / "run"
    with pytest.raises(Diverged, match=r"step 2: grad_norm=nan.*step-000002\) is intact"):
        train_mod.train(recipe(ckpt, out, "train.steps=4", "output.checkpoint_every=1", "output.keep_checkpoints=5"),
                        quiet=True, command="pgzoo train x.yaml")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    relaxed = train_mod.train(recipe(ckpt, tmp_path / "relaxed", "train.steps=3", "train.stop_on.nonfinite=false"),
                              quiet=True)
    assert math.isnan(relaxed.history[-1]["grad_norm"])
    monkeypatch.undo()  # the real update again
    with pytest.raises(Diverged, match=r"step 0: .*collapsed to uniform"):
        train_mod.train(recipe(ckpt, tmp_path / "u", "train.steps=2", "train.stop_on.entropy_uniform=0.9"),
                        quiet=True)


class _EngineReached(Exception):
    """Raised where the engine would start: what the test asserts is known by then."""


def test_train_threads_sizes_torch_pool_before_the_engine(ckpt, tmp_path, monkeypatch):
    seen = []
    real = train_mod.build_engine
    monkeypatch.setattr(train_mod, "build_engine", lambda r, p: (seen.append(torch.get_num_threads()), real(r, p))[1])
    torch.set_num_threads(2)
    train_mod.train(recipe(ckpt, tmp_path / "a", "train.steps=1", "output.checkpoint_every=0"), quiet=True)
    assert seen[-1] == 1 == torch.get_num_threads()  # the default: one thread per process

    # With 2 and 3 threads the step itself would run many times slower beside other busy processes (OpenMP
    # spin-waiting, the reason 1 is the default) and asserts nothing: these runs stop where the engine would start.
    def record_and_stop(r, p):
        seen.append(torch.get_num_threads())
        raise _EngineReached

    monkeypatch.setattr(train_mod, "build_engine", record_and_stop)
    with pytest.raises(_EngineReached):
        train_mod.train(recipe(ckpt, tmp_path / "b", "train.steps=1", "train.threads=2"), quiet=True)
    assert seen[-1] == 2
    torch.set_num_threads(3)
    with pytest.raises(_EngineReached):
        train_mod.train(recipe(ckpt, tmp_path / "c", "train.steps=1", "train.threads=null"), quiet=True)
    assert seen[-1] == 3  # null: torch's own setting is left alone


def test_trainer_evaluates_each_held_out_problem_once(ckpt):
    import pgzoo.tasks

    task = pgzoo.tasks.get("arithmetic", max_digits=1, operands=2)
    size = task.split_size("test")
    said = []
    r = load_recipe(RECIPE, [f"eval.num_problems={size + 50}"])
    problems = train_mod.eval_problems(r, task, said.append)["heldout"]
    assert len(problems) == size and len({p.prompt for p in problems}) == size
    assert f"holds {size}; evaluating all {size} once" in said[0]


def test_every_test_named_in_the_reliability_table_exists():
    import re

    root = pathlib.Path(__file__).resolve().parents[1]
    refs = set(re.findall(r"(tests/\w+\.py)::(\w+)", (root / "docs" / "reliability.md").read_text()))
    assert len(refs) > 30
    missing = [f"{f}::{t}" for f, t in sorted(refs) if f"def {t}(" not in (root / f).read_text()]
    assert not missing, missing
