"""Benchmark: what the per-step stop agreement of several ranks costs (pgzoo.adapters.lightning.signals.GracefulStop.agree).

    OMP_NUM_THREADS=1 python benchmarks/stop_flag.py [--ranks 2] [--calls 2000] [--run RUN_DIR]

After every optimizer step each rank all-reduces (MAX) one int32, the signal number it holds (0: none). This starts
``--ranks`` gloo processes on this machine, calls ``GracefulStop.agree`` ``--calls`` times on each (after 100 warm-up
calls) and prints the median and 99th percentile microseconds per call on rank 0. With ``--run``, it also prints the
median ``time/step`` of that run folder's metrics.csv and the agreement's share of it.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys


def _worker(rank: int, world: int, port: int, calls: int, queue) -> None:
    import time

    import torch
    import torch.distributed as dist

    from pgzoo.adapters.lightning.signals import GracefulStop

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    stop = GracefulStop(enabled=False, lead=rank == 0)
    times = []
    for i in range(100 + calls):
        t0 = time.perf_counter()
        assert not stop.agree()
        if i >= 100:
            times.append(time.perf_counter() - t0)
    dist.barrier()
    if rank == 0:
        queue.put(times)
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--run", help="a run folder: compare with its median time/step")
    args = ap.parse_args(argv)
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, args.ranks, port, args.calls, queue)) for r in range(args.ranks)]
    for p in procs:
        p.start()
    times = sorted(queue.get(timeout=600))
    for p in procs:
        p.join()
    med, p99 = statistics.median(times) * 1e6, times[int(0.99 * len(times))] * 1e6
    print(f"stop agreement, {args.ranks} gloo ranks, {args.calls} calls: median {med:.0f} us, p99 {p99:.0f} us")
    if args.run:
        from pgzoo.adapters.lightning.run_folder import read_metrics

        steps = [r["time/step"] for r in read_metrics(os.path.join(args.run, "metrics.csv")) if "time/step" in r]
        step = statistics.median(steps)
        print(f"median time/step of {args.run}: {step * 1e3:.1f} ms; the agreement is {med / 1e6 / step:.2%} of it")


if __name__ == "__main__":
    sys.exit(main())
