"""pgzoo.adapters.lightning.signals without a training run: the per-step agreement of ranks on a signal (two gloo processes), and the
quiet exit of a rank other than 0."""

from __future__ import annotations

import os
import signal
import socket

from pgzoo.adapters.lightning.signals import GracefulStop


def test_one_process_agrees_with_itself():
    said = []
    stop = GracefulStop(say=said.append)
    assert not stop.agree()
    stop._handler(signal.SIGTERM, None)
    assert stop.agree() and stop.signum == signal.SIGTERM
    assert said == ["pgzoo: SIGTERM received; stopping after the current step with a final checkpoint (Ctrl-C again "
                    "to stop at once)"]


def test_a_rank_other_than_0_says_nothing_and_exits_quietly(tmp_path, monkeypatch, capsys):
    said = []
    stop = GracefulStop(say=said.append, lead=False)
    stop._handler(signal.SIGINT, None)
    assert said == []
    err = stop.error(3, 9, tmp_path, "pgzoo train r.yaml")
    assert err.quiet and err.exit_code == 130

    import pgzoo.cli.train
    from pgzoo.cli.main import main

    def interrupted(args):
        raise err

    monkeypatch.setattr(pgzoo.cli.train, "run", interrupted)
    assert main(["train", "tiny/minirl"]) == 130
    assert capsys.readouterr().err == ""


CASES = {  # what each rank received -> the signal they agree on
    "rank1-sigterm": ([0, signal.SIGTERM], signal.SIGTERM),  # rank 1 alone (Lightning 2.6 would leave rank 0 waiting)
    "mixed": ([signal.SIGINT, signal.SIGTERM], signal.SIGTERM),  # SIGTERM wins: the scheduler's exit status
    "rank0-sigint": ([signal.SIGINT, 0], signal.SIGINT),
}


def _agree_worker(rank: int, port: int, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    for case, (signums, _) in CASES.items():
        said: list[str] = []
        stop = GracefulStop(say=said.append, lead=rank == 0)
        results = [stop.agree()]  # no signal yet: go on
        if signums[rank]:
            stop._handler(signums[rank], None)
        results.append(stop.agree())
        results.append(stop.agree())  # asked again (a later step): the same answer, said once
        queue.put((case, rank, results, stop.signum, said))
    dist.destroy_process_group()


def test_two_ranks_agree_on_a_signal_any_rank_received():
    import torch.multiprocessing as mp
    from conftest import DIST_ENV

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    env = {k: os.environ.pop(k) for k in DIST_ENV if k in os.environ}  # the spawned ranks join no other group
    try:
        procs = [ctx.Process(target=_agree_worker, args=(r, port, queue)) for r in range(2)]
        for p in procs:
            p.start()
        out = {(case, r): rest for case, r, *rest in (queue.get(timeout=120) for _ in range(2 * len(CASES)))}
        for p in procs:
            p.join(timeout=60)
    finally:
        os.environ.update(env)
    for case, (signums, agreed) in CASES.items():
        for rank in (0, 1):
            results, signum, said = out[case, rank]
            assert results == [False, True, True] and signum == agreed, case
            assert len(said) == (1 if rank == 0 else 0), case  # rank 0 alone speaks, once
        if signums[0] == 0:
            assert out[case, 0][2] == [f"pgzoo: {signal.Signals(agreed).name} received by another rank; stopping "
                                       "after the current step with a final checkpoint"]
