"""benchmarks/tiny_grid.py: recipe selection, skip-if-done, and the table it collects from run folders."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def grid():
    spec = importlib.util.spec_from_file_location("tiny_grid", ROOT / "benchmarks" / "tiny_grid.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_selects_tiny_recipes_by_pattern(grid):
    assert grid.tiny_recipes("offpolicy-n4-*") == [
        "tiny/offpolicy-n4-minirl-no-clip", "tiny/offpolicy-n4-minirl-no-clip-r2",
        "tiny/offpolicy-n4-minirl-r2", "tiny/offpolicy-n4-minirl-r3"]
    assert len(grid.tiny_recipes("*")) == 19  # the grid of 18 and minirl-lora
    assert grid.tiny_recipes("no-such-*") == []
    assert grid.tiny_recipes("minirl-no-is", "minirl") == ["tiny/minirl", "tiny/minirl-no-is"]


def _fake_run(out: Path, name: str, rewards: list[float], gaps: list[float]) -> None:
    run = out / name
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"steps": len(rewards), "seconds": 12.5}))
    (run / "eval.json").write_text(json.dumps({
        "before": {"greedy_accuracy": 0.5, "avg@1": 0.3},
        "after": {"greedy_accuracy": 0.75, "avg@1": 0.6}}))
    lines = ["step,reward/mean,first_order/gap_total,kl/train_inference_k1"]
    lines += [f"{i},{r},{g},1e-8" for i, (r, g) in enumerate(zip(rewards, gaps))]
    (run / "metrics.csv").write_text("\n".join(lines) + "\n")


def test_collects_eval_reward_gap_and_wall(grid, tmp_path):
    rewards = [0.1 * i for i in range(12)]
    _fake_run(tmp_path, "minirl-s0", rewards, [0.0] * 11 + [0.25])
    (tmp_path / "minirl-s0.wall").write_text("33.0\n")
    (tmp_path / "unfinished-s0").mkdir()  # no summary.json: not a finished run, left out
    rows = grid.collect(tmp_path)
    assert [r["run"] for r in rows] == ["minirl-s0"]
    row = rows[0]
    assert row["greedy_before"] == 0.5 and row["greedy_after"] == 0.75
    assert row["avg_after"] == ("avg@1", 0.6)
    assert row["reward_first10"] == pytest.approx(sum(rewards[:10]) / 10)
    assert row["reward_last10"] == pytest.approx(sum(rewards[-10:]) / 10)
    assert row["gap_total_max"] == 0.25 and row["wall_s"] == 33.0 and row["steps"] == 12
    table = grid.markdown(rows)
    assert "| minirl-s0 | 0.500 | **0.750** | 0.600 (avg@1) |" in table


def test_finished_runs_are_skipped_without_starting_a_process(grid, tmp_path, monkeypatch):
    _fake_run(tmp_path, "minirl-s0", [0.1], [0.0])
    monkeypatch.setattr(grid.subprocess, "call", lambda *a, **k: pytest.fail("a finished run was started again"))
    rc, _ = grid.run_one("tiny/minirl", 0, tmp_path, "", [])
    assert rc == 0


def test_summary_groups_seeds_of_one_recipe(grid, tmp_path):
    for seed, after in ((0, 0.75), (1, 0.65)):
        _fake_run(tmp_path, f"minirl-s{seed}", [0.1], [0.0])
        path = tmp_path / f"minirl-s{seed}" / "eval.json"
        path.write_text(json.dumps({"before": {"greedy_accuracy": 0.5}, "after": {"greedy_accuracy": after}}))
    _fake_run(tmp_path, "minirl-s0-fp8", [0.1], [0.5])
    table = grid.summarize(grid.collect(tmp_path))
    assert "| minirl | 2 | +0.250, +0.150 | **+0.200** | 0 |" in table
    assert "| minirl (fp8) | 1 | +0.250 | **+0.250** | 0.5 |" in table
    assert grid._recipe_of("offpolicy-n4-minirl-r2-s12") == ("offpolicy-n4-minirl-r2", "")
