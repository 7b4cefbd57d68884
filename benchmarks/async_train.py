"""Asynchronous against synchronous `pgzoo train`: step time with ``rollout.max_staleness=1`` over ``=0``, per engine.

    python benchmarks/async_train.py [--engines transformers vllm] [--reps 3] [--steps 8] [--model PATH] [key=value ...]

Each case is one `pgzoo train` process (``train.threads=1``: one torch thread per process; the background
generation thread and the update then each run their own ops on their own core), on ``recipes/tiny/minirl.yaml``
with 16 prompts x 8 completions per step (128), no evaluation, one checkpoint at the end. The cases run interleaved
(k=0, k=1, k=0, k=1, ...) so that load from other processes on a shared machine falls on both alike. Per case: the
median ``time/step`` over the steps after the first two (warm-up; step 0 of an asynchronous run also samples its
own rows in the foreground), and the process's CPU seconds per wall second (about 1 when one thread works, up to 2
when generation and update overlap; with vLLM at k >= 1 its engine core process is counted too, as a child), and the
1-minute load average of the machine at the case's start and end (what else competed for the cores). Reported per
engine: the ratio k=1 / k=0 of each interleaved pair, min and median over pairs. An engine that refuses k >= 1 is
reported with its reason. ``--model``: a Hugging Face checkpoint
(default: a freshly initialised tiny MoE, as the tests use); ``key=value``: further recipe overrides.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fresh_model(path: Path) -> Path:
    from pgzoo.models import build_tiny_moe, build_tokenizer

    if not (path / "config.json").exists():
        tok = build_tokenizer()
        model = build_tiny_moe(vocab_size=len(tok), seed=0)
        model.generation_config.do_sample = True
        model.save_pretrained(path)
        tok.save_pretrained(path)
    return path


def run_case(engine: str, k: int, model: Path, steps: int, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "pgzoo", "train", "tiny/minirl", f"model.path={model}", f"rollout.engine={engine}",
           f"rollout.max_staleness={k}", "rollout.prompts_per_step=16", "rollout.group_size=8",
           f"train.steps={steps}", "train.threads=1", "eval.before=false", "eval.after=false",
           "output.plots=false", "output.progress_bar=false", "output.checkpoint_every=0", f"output.dir={out}",
           *extra, "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    load_start = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        return {"engine": engine, "k": k, "error": (proc.stdout + proc.stderr).strip().splitlines()[-1]}
    from pgzoo.adapters.lightning.run_folder import read_metrics

    rows = [r for r in read_metrics(out / "metrics.csv") if "time/step" in r]
    timed = [r["time/step"] for r in rows[2:]] or [r["time/step"] for r in rows]
    return {"engine": engine, "k": k, "step_s": statistics.median(timed),
            "rollout_s": statistics.median(r["time/rollout"] for r in rows[2:] or rows),
            "old_logprobs_s": statistics.median(r.get("time/old_logprobs", 0.0) for r in rows[2:] or rows),
            "update_s": statistics.median(r["time/update"] for r in rows[2:] or rows),
            "sync_s": statistics.median(r["time/sync"] for r in rows[2:] or rows),
            "cpu_per_wall": cpu / wall, "wall_s": wall, "load": [load_start, os.getloadavg()[0]]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", nargs="+", default=["transformers", "vllm"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write every case here")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or fresh_model(Path(tmp) / "tiny")
        cases = []
        for engine in args.engines:
            for rep in range(args.reps):
                pair = {}
                for k in (0, 1):
                    case = run_case(engine, k, model, args.steps, Path(tmp) / f"{engine}-{rep}-{k}", args.overrides)
                    case["rep"] = rep
                    cases.append(case)
                    pair[k] = case
                    print(json.dumps(case), flush=True)
                if "error" in pair[1]:
                    break  # refused: one try says why
        print()
        print("| engine | k=0 step (s) | k=1 step (s) | ratio k=1/k=0 min | median | CPU s per wall s k=0, k=1 |")
        print("|---|---|---|---|---|---|")
        for engine in args.engines:
            mine = [c for c in cases if c["engine"] == engine]
            refused = [c for c in mine if c["k"] == 1 and "error" in c]
            if refused:
                base = statistics.median(c["step_s"] for c in mine if c["k"] == 0 and "step_s" in c)
                print(f"| {engine} | {base:.3f} | refused: {refused[0]['error']} | | | |")
                continue
            by_rep = {}
            for c in mine:
                by_rep.setdefault(c["rep"], {})[c["k"]] = c
            ratios = [p[1]["step_s"] / p[0]["step_s"] for p in by_rep.values() if 0 in p and 1 in p]
            med = lambda k, key: statistics.median(c[key] for c in mine if c["k"] == k)  # noqa: E731
            print(f"| {engine} | {med(0, 'step_s'):.3f} | {med(1, 'step_s'):.3f} | {min(ratios):.2f} | "
                  f"{statistics.median(ratios):.2f} | {med(0, 'cpu_per_wall'):.2f}, {med(1, 'cpu_per_wall'):.2f} |")
        if args.json is not None:
            args.json.write_text(json.dumps(cases, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
