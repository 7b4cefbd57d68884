"""`pgzoo train` on two gloo ranks (CPU, transformers rollouts), started three ways — Lightning's launcher
(`train.devices=2`), `torchrun --nproc-per-node 2 -m pgzoo`, and two torchrun "nodes" on this machine — writes one
run folder whose metrics are the same in all three and in a one-process run; `--resume` under FSDP continues exactly;
a rank killed with SIGKILL stops the others within bounded time with one error that says how to resume, the last
checkpoint intact.

Tolerance: the three launches run the same ranks with the same seeds, rows and gloo reductions, so every stable
metric (all but time/throughput) agrees to float32 rounding of the reductions (rel 1e-5); resume agrees the same way
(the optimizer shards and scheduler come back from the checkpoint, the weights from its consolidated folder)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pgzoo.models import fresh_tiny_checkpoint
from _train_helpers import child_pid, dense_task_plugin, stable, subprocess_env
from pgzoo.adapters.lightning.run_folder import latest_checkpoint, read_metrics

pytestmark = pytest.mark.slow
PGZOO = [sys.executable, "-m", "pgzoo"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return fresh_tiny_checkpoint(tmp_path_factory.mktemp("fresh") / "tiny")


@pytest.fixture(autouse=True, scope="module")
def dense_reward(tmp_path_factory):
    """Every child finds the dense-reward test task (``task.name=digit-fraction-test`` in :func:`args`): with the
    arithmetic task's reward a fresh model's gradients are all 0 and the runs would match trivially."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", dense_task_plugin(tmp_path_factory.mktemp("plugin")))
        yield


def args(ckpt, out, *extra) -> list[str]:
    return ["train", "tiny/minirl", f"model.path={ckpt}", "rollout.engine=transformers",
            "task.name=digit-fraction-test", "rollout.prompts_per_step=4", "rollout.group_size=2",
            "rollout.max_new_tokens=4", "train.lr=3e-3",
            "train.strategy=fsdp", "train.devices=2", "eval.before=false", "eval.after=false",
            "eval.every=2", "eval.num_problems=4",
            "output.progress_bar=false", "output.plots=false", "output.checkpoint_every=1",
            "output.keep_checkpoints=5", f"output.dir={out}", *extra, "--quiet"]


def run(cmd: list[str], timeout: float = 400) -> str:
    env = subprocess_env(OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    return p.stdout + p.stderr


def same_metrics(a: Path, b: Path, skip: tuple[str, ...] = ()) -> None:
    ra, rb = read_metrics(a / "metrics.csv"), read_metrics(b / "metrics.csv")
    if skip:  # rows holding only skipped columns (an evaluation row) go too
        ra, rb = ([r for r in rows if any(k != "step" and not k.startswith(skip) for k in r)] for rows in (ra, rb))
    assert [r["step"] for r in ra] == [r["step"] for r in rb] and ra
    for x, y in zip(ra, rb):
        x = {k: v for k, v in stable(x).items() if not k.startswith(skip)}
        y = {k: v for k, v in stable(y).items() if not k.startswith(skip)}
        assert set(x) == set(y)
        for k in x:
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-6), (k, x["step"])


@pytest.fixture(scope="module")
def reference(ckpt, tmp_path_factory):
    """Three FSDP steps on two ranks started by Lightning (`train.devices=2`, no launcher around)."""
    out = tmp_path_factory.mktemp("lightning") / "run"
    run([*PGZOO, *args(ckpt, out, "train.steps=3")])
    assert all(r["grad_norm"] > 0 for r in read_metrics(out / "metrics.csv") if "grad_norm" in r)  # not trivially equal
    return out


def test_lightning_launcher_writes_one_run_folder(reference):
    rows = read_metrics(reference / "metrics.csv")
    assert [r["step"] for r in rows if "reward/mean" in r] == [0, 1, 2]  # one row per step: rank 0 alone logs
    assert latest_checkpoint(reference).name == "step-000003"
    import json

    summary = json.loads((reference / "summary.json").read_text())
    assert summary["strategy"] == "fsdp" and summary["world_size"] == 2
    # the consolidated checkpoint is a plain Hugging Face folder
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(latest_checkpoint(reference))
    assert type(model).__name__ == json.loads((latest_checkpoint(reference) / "config.json").read_text())[
        "architectures"][0]
    assert (latest_checkpoint(reference) / "optimizer").is_dir()  # sharded optimizer state
    # eval.every=2 under FSDP: gathered on every rank, evaluated on rank 0
    assert "greedy_accuracy" in json.loads((reference / "eval.json").read_text())["during"]["2"]


def test_torchrun_matches(ckpt, reference, tmp_path):
    out = tmp_path / "run"
    run([*TORCHRUN, "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
         "-m", "pgzoo", *args(ckpt, out, "train.steps=3")])
    same_metrics(out, reference)


def test_two_nodes_match(ckpt, reference, tmp_path):
    out, port = tmp_path / "run", free_port()
    env = subprocess_env(OMP_NUM_THREADS="1")
    nodes = [subprocess.Popen([*TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(k),
                               "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "pgzoo",
                               *args(ckpt, out, "train.steps=3", "train.devices=1", "train.num_nodes=2")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for k in (0, 1)]
    try:
        outs = [p.communicate(timeout=400)[0] for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in nodes), "\n".join(o[-3000:] for o in outs)
    same_metrics(out, reference)


def test_one_process_matches(ckpt, reference, tmp_path):
    """Each prompt is sampled with its own seed (its index among the step's prompts), so the two ranks draw the rows
    one process draws. Same tolerance as the launches above: measured, the largest relative difference of a stable
    metric is 1e-7 (entropy; the weights differ only by the order of the gradient sum). The control: with one seed per
    rank (the rows drawn differently) entropy/mean of this near-uniform fresh model already differs by 1.3e-4."""
    out = tmp_path / "run"
    run([*PGZOO, *args(ckpt, out, "train.steps=3", "train.devices=1", "train.strategy=auto")])
    same_metrics(out, reference)


def test_asynchronous_fsdp_and_ddp_match_one_process(ckpt, tmp_path):
    """rollout.max_staleness=1 on two FSDP ranks and on two DDP ranks: each rank samples its share of the next step in
    its background thread (no collective there), the staleness schedule is a function of the step, so the two ranks
    train on the rows, sampled by the versions, one asynchronous process would; same tolerance as the launches above.
    The weight sync runs in the trainer's thread under FSDP (its gather is collective) and in the background thread
    under DDP and in one process (docs/training.md, "The sync in the background"). The FSDP pair runs with
    ``train.old_policy=sampling``: the pass that scores the rows sampled ahead runs between the first backward and
    the first optimizer step, a sharded forward on both ranks at that point."""
    fsdp, ddp, one, one_sampling = (tmp_path / name for name in ("fsdp", "ddp", "one", "one-sampling"))
    asynchronous = ["train.steps=3", "rollout.max_staleness=1"]
    single = ["train.devices=1", "train.strategy=auto"]
    run([*PGZOO, *args(ckpt, fsdp, *asynchronous, "train.old_policy=sampling")])
    run([*PGZOO, *args(ckpt, ddp, *asynchronous, "train.strategy=ddp")])
    run([*PGZOO, *args(ckpt, one, *asynchronous, *single)])
    run([*PGZOO, *args(ckpt, one_sampling, *asynchronous, *single, "train.old_policy=sampling")])
    same_metrics(fsdp, one_sampling)
    same_metrics(ddp, one)
    rows = [r for r in read_metrics(fsdp / "metrics.csv") if "reward/mean" in r]
    assert all(r["grad_norm"] > 0 for r in rows)
    # step 0 trains on its own rows; steps 1-2 on version 0's and 1's, against those versions' π_θold
    assert rows[0]["first_order/gap_staleness"] == 0.0 and rows[2]["first_order/gap_staleness"] > 0.0
    for run_dir in (fsdp, ddp):
        rows = [r for r in read_metrics(run_dir / "metrics.csv") if "reward/mean" in r]
        assert [r["staleness/max"] for r in rows] == [0.0, 1.0, 1.0]
    waits = [r["time/sync_wait"] for r in read_metrics(fsdp / "metrics.csv") if "reward/mean" in r]
    assert waits == [0.0, 0.0, 0.0]  # FSDP: no background sync to wait for


def test_fsdp_resume_is_exact(ckpt, reference, tmp_path):
    """The reference run as if killed right after its step-2 checkpoint (checkpoint_every=1 kept every one; a copy
    without step-000003, metrics.csv cut back to the steps before it), resumed under FSDP: one two-rank launch
    instead of a 2-step run of its own plus the resume."""
    import csv
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    shutil.rmtree(out / "checkpoints" / "step-000003")
    with open(out / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, [r for r in reader if float(r["step"]) < 2]
    with open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    assert latest_checkpoint(out).name == "step-000002" and {int(float(r["step"])) for r in rows} == {0, 1}
    run([*PGZOO, *args(ckpt, out, "train.steps=3"), "--resume"])
    same_metrics(out, reference, skip=("eval/",))  # the evaluation rows before step 2 are the reference's own copy
    from safetensors.torch import load_file

    a = load_file(latest_checkpoint(out) / "model.safetensors")
    b = load_file(latest_checkpoint(reference) / "model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


def test_a_killed_rank_stops_the_run_with_a_resume_hint(ckpt, tmp_path):
    out = tmp_path / "run"
    env = subprocess_env(OMP_NUM_THREADS="1")
    cmd = [*TORCHRUN, "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "-m", "pgzoo", *args(ckpt, out, "train.steps=50")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while latest_checkpoint(out) is None or latest_checkpoint(out).name < "step-000002":
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
            time.sleep(0.5)
        rank1 = child_pid(proc.pid, b"RANK=1")
        os.kill(rank1, signal.SIGKILL)  # mid-step: step 2 or 3 is running
        t0 = time.monotonic()
        text = proc.communicate(timeout=120)[0]
        assert time.monotonic() - t0 < 120
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    errors = [line for line in text.splitlines() if line.startswith("pgzoo: error")]
    assert len(errors) == 1, text[-3000:]  # the surviving rank's one error
    assert "--resume" in errors[0] and "is intact" in errors[0]
    last = latest_checkpoint(out)
    import transformers

    transformers.AutoModelForCausalLM.from_pretrained(last)  # the last checkpoint loads


