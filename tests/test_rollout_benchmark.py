"""`benchmarks/rollout.py` interleaves rounds and reports in-round ratios to transformers float32 and min/median
summaries (transformers engines only, on a random tiny MoE: seconds)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _benchmark():
    spec = importlib.util.spec_from_file_location("rollout_benchmark", ROOT / "benchmarks" / "rollout.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rounds_interleave_engines_and_summarise(tmp_path, capsys):
    bench = _benchmark()
    out = tmp_path / "r.json"
    assert bench.main(["--model", "random", "--prompts", "2", "--n", "1", "--max-new-tokens", "2", "--rounds", "2",
                       "--repeats", "1", "--syncs", "1", "--no-vllm", "--engines", "transformers-fp8",
                       "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "torch_threads=" in printed and "OMP_NUM_THREADS=" in printed and "VLLM_CPU_OMP_THREADS_BIND=" in printed
    data = json.loads(out.read_text())
    rows = data["rounds"]
    assert [r["round"] for r in rows] == [0, 0, 1, 1]
    # the order rotates: transformers-fp32 first in round 1, second in round 2
    assert [r["engine"] for r in rows] == ["transformers-fp32", "transformers-fp8", "transformers-fp8",
                                          "transformers-fp32"]
    for rnd in (0, 1):
        fp32 = next(r for r in rows if r["round"] == rnd and r["engine"] == "transformers-fp32")
        fp8 = next(r for r in rows if r["round"] == rnd and r["engine"] == "transformers-fp8")
        assert fp32["vs_fp32_wall"] == 1.0 and fp32["vs_fp32_cpu"] == 1.0
        assert fp8["vs_fp32_wall"] == pytest.approx(fp8["tokens_per_s"] / fp32["tokens_per_s"], rel=1e-2)
        assert fp8["vs_fp32_cpu"] == pytest.approx(fp8["tokens_per_cpu_s"] / fp32["tokens_per_cpu_s"], rel=1e-2)
    summary = {s["engine"]: s for s in data["summary"]}
    assert set(summary) == {"transformers-fp32", "transformers-fp8"}
    for s in summary.values():
        assert s["rounds"] == 2
        for key in ("tokens_per_s", "tokens_per_cpu_s", "vs_fp32_wall", "vs_fp32_cpu"):
            assert s[key]["min"] <= s[key]["median"] <= s[key]["max"]
        assert s["discrepancy_same_every_round"]
    assert summary["transformers-fp32"]["mean_abs_dlogp"] < 1e-4  # float32 engine vs float32 forward
    assert data["settings"]["torch_threads"] >= 1 and "OMP_NUM_THREADS" in data["settings"]["env"]


def test_bad_counts_are_refused():
    bench = _benchmark()
    with pytest.raises(SystemExit):
        bench.main(["--rounds", "0"])
    with pytest.raises(SystemExit):
        bench.main(["--engines", "nope"])
