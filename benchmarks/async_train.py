"""Asynchronous against synchronous `pgzoo train`, and both against TRL's GRPOTrainer, on the same work: step times.

    python benchmarks/async_train.py [--engines transformers vllm] [--trl generate vllm] [--reps 3] [--steps 10]
                                     [--old-policies current sampling] [--model PATH] [--json FILE] [key=value ...]

Each case is one process with one torch thread (``OMP_NUM_THREADS=1``; `pgzoo train` with ``train.threads=1``: the
background generation thread and the update then each run their own ops on their own core). The work: the arithmetic
task, 16 prompts x 8 completions (128 rows) of at most 8 tokens per step, one optimizer step per step, no evaluation.
`pgzoo train` cases run ``recipes/tiny/minirl.yaml`` with ``rollout.max_staleness`` k = 0 and k = 1 for each of
``--engines``, the k = 1 case once per ``--old-policies`` (``train.old_policy``; default ``current``; a
``sampling`` case is named ``ENGINE k=1 sampling``); ``--trl`` adds TRL 1.16's own ``GRPOTrainer`` on the same
problems, model and reward (benchmarks/trl_grpo_step.py): ``generate`` (TRL's default: ``generate`` from the
training model) and ``vllm`` (pgzoo's vLLM engine as TRL's ``rollout_func``). Every repetition runs every case once,
in the same order, so that load from other processes on a shared machine falls on all alike.

Per case: the median step time over the steps after the first two (warm-up; step 0 of an asynchronous run also
samples its own rows in the foreground): `pgzoo train`'s ``time/step`` (rollout, update, sync), TRL's
``on_step_begin`` to ``on_step_end`` (TRL generates inside the step); the phases of `pgzoo train`; the mean
completion length (the engines draw different tokens, and the update's cost follows the lengths); the process's CPU
seconds per wall second (with vLLM at k >= 1 its engine core process is counted too, as a child; start-up included)
and the 1-minute load average at the case's start and end. Reported: per engine, the ratio k=1 / k=0 within each
repetition; the fastest `pgzoo train` case over the fastest TRL case within each repetition; min and median over
repetitions. ``--model``: a Hugging Face checkpoint (default: a freshly initialised tiny MoE, as the tests use);
``key=value``: further recipe overrides of the `pgzoo train` cases.
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
from collections.abc import Callable
from pathlib import Path

from pgzoo.models import fresh_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def timed_process(cmd: list[str]) -> tuple[subprocess.CompletedProcess, dict]:
    """Run ``cmd`` with one torch thread; its wall seconds, CPU seconds per wall second (children included) and the
    1-minute load average at its start and end."""
    load_start = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          check=False)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return proc, {"cpu_per_wall": cpu / wall, "wall_s": wall, "load": [load_start, os.getloadavg()[0]]}


def last_line(proc: subprocess.CompletedProcess) -> str:
    return (proc.stdout + proc.stderr).strip().splitlines()[-1]


def run_case(engine: str, k: int, model: Path, steps: int, out: Path, extra: list[str],
             old_policy: str = "current") -> dict:
    proc, usage = timed_process([
        sys.executable, "-m", "pgzoo", "train", "tiny/minirl", f"model.path={model}", f"rollout.engine={engine}",
        f"rollout.max_staleness={k}", f"train.old_policy={old_policy}", "rollout.prompts_per_step=16",
        "rollout.group_size=8", f"train.steps={steps}",
        "train.threads=1", "eval.before=false", "eval.after=false", "output.plots=false",
        "output.progress_bar=false", "output.checkpoint_every=0", f"output.dir={out}", *extra, "--quiet"])
    if proc.returncode != 0:
        return {"engine": engine, "k": k, "error": last_line(proc)}
    from pgzoo.adapters.lightning.run_folder import read_metrics

    rows = [r for r in read_metrics(out / "metrics.csv") if "time/step" in r]
    timed = rows[2:] or rows
    phase = lambda key: statistics.median(r.get(key, 0.0) for r in timed)  # noqa: E731
    return {"engine": engine, "k": k, "step_s": phase("time/step"), "rollout_s": phase("time/rollout"),
            "old_logprobs_s": phase("time/old_logprobs"), "update_s": phase("time/update"),
            "sync_s": phase("time/sync"), "length_mean": statistics.mean(r["response/length_mean"] for r in rows),
            **usage}


def case_name(engine: str, k: int, old_policy: str = "current") -> str:
    """``ENGINE k=K``, with `` sampling`` appended for a ``train.old_policy=sampling`` case."""
    return f"{engine} k={k}" + (" sampling" if old_policy == "sampling" else "")


def run_trl_case(rollout: str, model: Path, steps: int, out: Path) -> dict:
    proc, usage = timed_process([sys.executable, str(ROOT / "benchmarks" / "trl_grpo_step.py"), "--model",
                                 str(model), "--rollout", rollout, "--steps", str(steps), "--out", str(out)])
    case = f"trl-{rollout}"
    if proc.returncode != 0:
        return {"case": case, "error": last_line(proc)}
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"case": case, "step_s": got["step_s"], "length_mean": got["length_mean"], **usage}


def ratios(cases: list[dict], num: Callable[[dict], bool], den: Callable[[dict], bool]) -> list[float]:
    """Per repetition: the fastest case matching ``num`` over the fastest matching ``den``."""
    out = []
    for rep in sorted({c["rep"] for c in cases}):
        mine = [c for c in cases if c["rep"] == rep and "step_s" in c]
        a, b = [c["step_s"] for c in mine if num(c)], [c["step_s"] for c in mine if den(c)]
        if a and b:
            out.append(min(a) / min(b))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", nargs="*", default=["transformers", "vllm"])
    ap.add_argument("--trl", nargs="*", default=[], choices=["generate", "vllm"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--old-policies", nargs="+", default=["current"], choices=["current", "sampling"])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write every case here")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or fresh_tiny_checkpoint(Path(tmp) / "tiny")
        plan = ([(engine, 0, "current") for engine in args.engines]
                + [(engine, 1, old) for engine in args.engines for old in args.old_policies]
                + [("trl", r, None) for r in args.trl])
        cases, refused = [], set()
        for rep in range(args.reps):
            for what, arg, old in plan:
                if (what, arg, old) in refused:
                    continue
                out = Path(tmp) / f"{what}-{arg}-{old}-{rep}"
                if what == "trl":
                    case = run_trl_case(arg, model, args.steps, out)
                else:
                    case = run_case(what, arg, model, args.steps, out, args.overrides, old)
                    case["case"] = case_name(what, arg, old)
                case["rep"] = rep
                cases.append(case)
                print(json.dumps(case), flush=True)
                if "error" in case:
                    refused.add((what, arg, old))  # refused or broken: one try says why
        print()
        print("| case | step (s), median | completion length | CPU s per wall s | note |")
        print("|---|---|---|---|---|")
        for name in dict.fromkeys(c["case"] for c in cases):
            mine = [c for c in cases if c["case"] == name]
            ok = [c for c in mine if "step_s" in c]
            if not ok:
                print(f"| {name} | | | | {mine[0]['error']} |")
                continue
            step, length, cpu = (statistics.median(c[key] for c in ok) for key in ("step_s", "length_mean",
                                                                                   "cpu_per_wall"))
            print(f"| {name} | {step:.3f} | {length:.2f} | {cpu:.2f} | |")
        print()
        compared = [(f"{case_name(e, 1, old)} / k=0", ratios(cases, lambda c, n=case_name(e, 1, old): c["case"] == n,
                                                             lambda c, n=case_name(e, 0): c["case"] == n))
                    for e in args.engines for old in args.old_policies]
        if args.trl:
            compared.append(("fastest pgzoo train / fastest TRL",
                             ratios(cases, lambda c: not c["case"].startswith("trl"), lambda c: c["case"].startswith("trl"))))
        print("| ratio | min | median | per repetition |")
        print("|---|---|---|---|")
        for name, r in compared:
            if r:
                print(f"| {name} | {min(r):.2f} | {statistics.median(r):.2f} | {', '.join(f'{x:.2f}' for x in r)} |")
        if args.json is not None:
            args.json.write_text(json.dumps(cases, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
