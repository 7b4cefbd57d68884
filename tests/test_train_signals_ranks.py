"""Real two-rank `pgzoo train` runs (Lightning's launcher, `train.strategy=ddp train.devices=2`, transformers rollouts)
stopped by a signal: SIGTERM to every rank (a scheduler), SIGTERM to rank 0 only (`kill PID`), SIGINT to the whole
process group (Ctrl-C). The ranks agree on the step, write its checkpoint together (intact by its manifest), every
process exits 143 / 130, rank 0 alone prints the message and the resume hint, metrics.csv has every row, and
`--resume` to the end gives the uninterrupted run's metrics and weights.

The exit status of rank 1 (a child of rank 0, not of the test) is read by making the test process a child subreaper
(Linux ``prctl(PR_SET_CHILD_SUBREAPER)``) for the run: rank 1 outlives rank 0 by design, is re-parented to the test
and reaped with ``waitpid``."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pgzoo.models import fresh_tiny_checkpoint
from _train_helpers import child_pid, stable, subprocess_env, train_steps
from pgzoo.adapters.lightning.run_folder import latest_checkpoint, read_metrics

from pgzoo.fileio import verify_folder

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl, /proc")]
STEPS = 6
PR_SET_CHILD_SUBREAPER = 36


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return fresh_tiny_checkpoint(tmp_path_factory.mktemp("fresh") / "tiny")


def command(ckpt, out, *extra, strategy: str = "ddp") -> list[str]:
    return [sys.executable, "-m", "pgzoo", "train", "tiny/minirl", f"model.path={ckpt}", "rollout.engine=transformers",
            "rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=4", "train.lr=3e-3",
            f"train.strategy={strategy}", "train.devices=2", f"train.steps={STEPS}", "eval.before=false",
            "eval.after=false", "output.progress_bar=false", "output.plots=false", "output.checkpoint_every=0",
            f"output.dir={out}", *extra, "--quiet"]


@pytest.fixture(scope="module")
def reference(ckpt, tmp_path_factory):
    """The uninterrupted run."""
    return uninterrupted(ckpt, tmp_path_factory.mktemp("uninterrupted") / "run")


def uninterrupted(ckpt, out, strategy: str = "ddp") -> Path:
    p = subprocess.run(command(ckpt, out, strategy=strategy), env=subprocess_env(OMP_NUM_THREADS="1"),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    return out


@pytest.fixture
def subreaper():
    """The test process adopts orphaned descendants (rank 1 once rank 0 has exited) for the test's duration."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    yield
    libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def child_rank(parent: int, timeout: float = 120) -> int:
    """The pid of rank 1: the child of ``parent`` (rank 0) started by Lightning's launcher with LOCAL_RANK=1."""
    return child_pid(parent, b"LOCAL_RANK=1", timeout)


def interrupted_run(ckpt, out, send, strategy: str = "ddp", *extra: str) -> tuple[str, int, int]:
    """Start a run, call ``send(rank0_pid, rank1_pid)`` once step 1 is logged; (output, rank 0's and rank 1's exit
    status)."""
    proc = subprocess.Popen(command(ckpt, out, *extra, strategy=strategy), env=subprocess_env(OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    rank1 = None
    try:
        rank1 = child_rank(proc.pid)
        deadline = time.monotonic() + 240
        while not (out / "metrics.csv").exists() or len(train_steps(out)) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
            time.sleep(0.1)
        send(proc.pid, rank1)
        text = proc.communicate(timeout=120)[0]
        status1 = os.waitstatus_to_exitcode(os.waitpid(rank1, 0)[1])  # re-parented to the test (subreaper)
        rank1 = None
    finally:
        if proc.poll() is None or rank1 is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            with contextlib.suppress(ChildProcessError):
                os.waitpid(rank1, 0) if rank1 is not None else None
    return text, proc.returncode, status1


def check_stopped(out, text, name) -> None:
    steps = train_steps(out)
    last = steps[-1]
    assert steps == list(range(last + 1)) and last < STEPS - 1, text[-3000:]
    final = latest_checkpoint(out)
    assert final.name == f"step-{last + 1:06d}" and verify_folder(final) is None  # the agreed step, intact
    assert text.count(f"pgzoo: {name} received") == 1, text[-3000:]  # rank 0 says it once
    stopped = [line for line in text.splitlines() if line.startswith("pgzoo: stopped")]
    assert len(stopped) == 1 and f"stopped after step {last} of {STEPS}; checkpoint " in stopped[0], text[-3000:]
    assert "--resume" in stopped[0]


def check_stopped_then_resume(ckpt, out, reference, text, name, strategy: str = "ddp") -> None:
    check_stopped(out, text, name)
    # continue to the end: the uninterrupted run's metrics and weights
    p = subprocess.run([*command(ckpt, out, strategy=strategy), "--resume"], env=subprocess_env(OMP_NUM_THREADS="1"),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert train_steps(out) == list(range(STEPS))
    ra, rb = read_metrics(out / "metrics.csv"), read_metrics(reference / "metrics.csv")
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(map(stable, ra), map(stable, rb)):
        assert set(x) == set(y)
        for k in x:
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-6), (k, x["step"])
    from safetensors.torch import load_file

    a = load_file(latest_checkpoint(out) / "model.safetensors")
    b = load_file(latest_checkpoint(reference) / "model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


def test_sigterm_to_every_rank_stops_after_an_agreed_step_with_a_final_checkpoint(ckpt, reference, tmp_path,
                                                                                   subreaper):
    out = tmp_path / "run"

    def every_rank(rank0, rank1):  # a scheduler (SLURM) signals every process of the job
        os.kill(rank1, signal.SIGTERM)
        os.kill(rank0, signal.SIGTERM)

    text, status0, status1 = interrupted_run(ckpt, out, every_rank)
    assert (status0, status1) == (143, 143), text[-3000:]
    check_stopped_then_resume(ckpt, out, reference, text, "SIGTERM")


def test_sigterm_under_fsdp_writes_every_optimizer_shard(ckpt, tmp_path, subreaper):
    out = tmp_path / "run"

    def every_rank(rank0, rank1):
        os.kill(rank0, signal.SIGTERM)
        os.kill(rank1, signal.SIGTERM)

    text, status0, status1 = interrupted_run(ckpt, out, every_rank, strategy="fsdp")
    assert (status0, status1) == (143, 143), text[-3000:]
    assert len(list((latest_checkpoint(out) / "optimizer").glob("*.distcp"))) == 2  # one shard per rank
    check_stopped(out, text, "SIGTERM")  # resuming a FSDP checkpoint: test_train_multiprocess.py (the same writer)


def test_sigterm_to_rank_0_only_stops_every_rank(ckpt, reference, tmp_path, subreaper):
    out = tmp_path / "run"
    text, status0, status1 = interrupted_run(ckpt, out, lambda rank0, rank1: os.kill(rank0, signal.SIGTERM))
    assert (status0, status1) == (143, 143), text[-3000:]
    check_stopped_then_resume(ckpt, out, reference, text, "SIGTERM")


def test_sigterm_to_rank_1_only_stops_every_rank(ckpt, tmp_path, subreaper):
    out = tmp_path / "run"
    text, status0, status1 = interrupted_run(ckpt, out, lambda rank0, rank1: os.kill(rank1, signal.SIGTERM))
    assert (status0, status1) == (143, 143), text[-3000:]
    assert "pgzoo: SIGTERM received by another rank; stopping after the current step" in text, text[-3000:]
    last = train_steps(out)[-1]
    assert latest_checkpoint(out).name == f"step-{last + 1:06d}" and verify_folder(latest_checkpoint(out)) is None


def test_ctrl_c_to_the_process_group_exits_130_on_every_rank(ckpt, tmp_path, subreaper):
    out = tmp_path / "run"
    text, status0, status1 = interrupted_run(ckpt, out, lambda rank0, rank1: os.killpg(rank0, signal.SIGINT))
    assert (status0, status1) == (130, 130), text[-3000:]
    check_stopped(out, text, "SIGINT")  # resuming is the SIGTERM tests' (the checkpoint is the same kind)


def test_a_second_ctrl_c_stops_every_rank_at_once(ckpt, tmp_path, subreaper):
    out = tmp_path / "run"

    def twice(rank0, rank1):
        os.killpg(rank0, signal.SIGINT)
        time.sleep(0.05)
        os.killpg(rank0, signal.SIGINT)

    t0 = time.monotonic()
    text, status0, status1 = interrupted_run(ckpt, out, twice, "ddp", "output.checkpoint_every=1",
                                             "output.keep_checkpoints=2")
    assert time.monotonic() - t0 < 180
    assert status0 == 130, text[-3000:]
    assert status1 in (130, -signal.SIGKILL)  # its own Ctrl-C, or Lightning's launcher killing its child ranks
    assert "pgzoo: stopped: SIGINT received: stopped after step" in text and "--resume" in text
    assert verify_folder(latest_checkpoint(out)) is None  # the newest checkpoint is intact


def test_sigterm_to_torchrun_reaches_its_workers_and_they_stop_together(ckpt, tmp_path):
    """torchrun starts each worker in its own session and, on SIGTERM, sends it to every worker (then kills them
    after TORCH_ELASTIC_SHUTDOWN_TIMEOUT, 30 s): the workers stop after an agreed step with its checkpoint."""
    import socket

    out = tmp_path / "run"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), "-m", "pgzoo", *command(ckpt, out)[3:]]
    proc = subprocess.Popen(cmd, env=subprocess_env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "metrics.csv").exists() or len(train_steps(out)) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        text = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0  # torchrun itself was terminated
    assert not [line for line in text.splitlines() if line.startswith("pgzoo: error")], text[-3000:]
    check_stopped(out, text, "SIGTERM")
    assert "continue with: the same torchrun command" in text
