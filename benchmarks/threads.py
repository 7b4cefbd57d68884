"""Benchmark: a training step's time on an idle CPU and beside a busy process, for torch thread counts.

    OMP_NUM_THREADS=1 python benchmarks/threads.py [--threads 1 2] [--rounds 5] [--steps 6] [--hogs 1]

A "step" is what dominates a `pgzoo train` update on the tiny MoE: a forward and backward pass of the policy on
64 responses of 48 tokens through a MiniRL loss, and an AdamW step. Each case runs in a fresh process with
``torch.set_num_threads(threads)``; a "hog" is another process spinning on one core (what a second job on a shared
2-core machine does). Cases are interleaved round by round so drifting load hits all of them alike; the table
reports min and median seconds per step and the ratio hog / idle for each thread count.

The finding this measures: with as many torch threads as cores, one busy core makes OpenMP's spin-waiting threads
wait on each other and a step becomes many times slower; with one thread per process it does not. That is why
`train.threads` defaults to one thread per process on CPU (docs/training.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _step_times(threads: int, steps: int) -> list[float]:
    import torch

    import pgzoo
    from pgzoo.models import build_tiny_moe, build_tokenizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tok = build_tokenizer()
    model = build_tiny_moe(vocab_size=len(tok), seed=0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(3, len(tok), (64, 48))
    adv = torch.randn(64)
    loss_fn = pgzoo.get("minirl", metrics=False)
    times = []
    for _ in range(steps + 1):  # the first step warms up allocators and kernels
        t0 = time.perf_counter()
        logits = model(ids).logits[:, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        mask = torch.ones_like(lp, dtype=torch.bool)
        out = loss_fn(pgzoo.TokenBatch(logprobs=lp, mask=mask, advantages=adv, rollout_logprobs=lp.detach()))
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times[1:]


def _case(threads: int, steps: int, hogs: int) -> list[float]:
    spin = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(hogs)]
    try:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        out = subprocess.run([sys.executable, __file__, "--worker", str(threads), str(steps)], env=env,
                             capture_output=True, text=True, check=True, timeout=1800)
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        for p in spin:
            p.kill()
            p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--hogs", type=int, default=1, help="busy processes beside the step in the 'hog' cases")
    ap.add_argument("--worker", nargs=2, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(_step_times(*args.worker)))
        return
    results: dict[tuple[int, str], list[float]] = {}
    for r in range(args.rounds):
        for threads in args.threads:
            for load in ("idle", "hog"):
                times = _case(threads, args.steps, args.hogs if load == "hog" else 0)
                results.setdefault((threads, load), []).extend(times)
                print(f"round {r} threads={threads} {load}: median {statistics.median(times):.3f} s", flush=True)
    print("\n| torch threads | idle min / median (s) | beside a busy process min / median (s) | median ratio |")
    print("|---|---|---|---|")
    for threads in args.threads:
        idle, hog = results[(threads, "idle")], results[(threads, "hog")]
        print(f"| {threads} | {min(idle):.3f} / {statistics.median(idle):.3f} | {min(hog):.3f} / "
              f"{statistics.median(hog):.3f} | {statistics.median(hog) / statistics.median(idle):.2f}x |")
    print(f"\n{os.cpu_count()} CPUs, {args.rounds} rounds x {args.steps} steps per case, {args.hogs} busy process(es)")


if __name__ == "__main__":
    main()
