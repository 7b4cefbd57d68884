"""Real `pgzoo train` processes stopped from outside: SIGKILL after a checkpoint then `--resume` leaves every
metrics row 0..N-1 and no temporary folder; SIGINT and SIGTERM stop after the current step with a message, a final
checkpoint, summary.json and exit status 130 / 143."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from pgzoo.models import fresh_tiny_checkpoint
from _train_helpers import subprocess_env, train_steps, wait_for
from pgzoo.adapters.lightning.run_folder import latest_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return fresh_tiny_checkpoint(tmp_path_factory.mktemp("fresh") / "tiny")


def command(ckpt, out, *extra) -> list[str]:
    return [sys.executable, "-m", "pgzoo", "train", "tiny/minirl", f"model.path={ckpt}", "rollout.engine=transformers",
            "rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=4", "train.lr=3e-3",
            "eval.before=false", "eval.after=false", "output.progress_bar=false", "output.plots=false",
            f"output.dir={out}", *extra]


def start(cmd):
    env = subprocess_env(OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("extra", [(), ("rollout.max_staleness=1",)], ids=["sync", "async-k1"])
def test_sigkill_after_a_checkpoint_then_resume_keeps_every_row(ckpt, tmp_path, extra):
    out = tmp_path / "run"
    cmd = command(ckpt, out, "train.steps=8", "output.checkpoint_every=2", "output.keep_checkpoints=5", *extra,
                  "--quiet")
    proc = start(cmd)
    try:
        wait_for(proc, lambda: (latest_checkpoint(out) or out).name >= "step-000004")
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    done = subprocess.run([*cmd, "--resume"], env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert train_steps(out) == list(range(8))
    assert json.loads((out / "summary.json").read_text())["steps"] == 8
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("sig, status, extra", [(signal.SIGINT, 130, ()), (signal.SIGTERM, 143, ()),
                                                (signal.SIGTERM, 143, ("rollout.max_staleness=1",))],
                         ids=["SIGINT", "SIGTERM", "SIGTERM-async-k1"])
def test_signal_stops_after_the_step_with_a_final_checkpoint(ckpt, tmp_path, sig, status, extra):
    """Asynchronously (k=1) the background generation of the next step has finished when a step ends, so the final
    checkpoint holds it (rollouts/rank-00000.pt) and nothing is left running."""
    out = tmp_path / "run"
    proc = start(command(ckpt, out, "train.steps=200", "output.checkpoint_every=0", *extra, "--quiet"))
    try:
        wait_for(proc, lambda: len(train_steps(out)) >= 2)
        proc.send_signal(sig)
        text = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == status, text[-3000:]
    name = signal.Signals(sig).name
    assert f"pgzoo: {name} received; stopping after the current step" in text
    steps = train_steps(out)
    last = steps[-1]
    assert steps == list(range(last + 1))
    assert f"pgzoo: stopped: {name} received: stopped after step {last} of 200; checkpoint " in text
    assert "--resume" in text
    assert latest_checkpoint(out).name == f"step-{last + 1:06d}"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] == name and summary["steps"] == last + 1
    assert (latest_checkpoint(out) / "rollouts" / "rank-00000.pt").is_file() == bool(extra)


def test_a_second_ctrl_c_stops_at_once_with_status_130(ckpt, tmp_path):
    out = tmp_path / "run"
    proc = start(command(ckpt, out, "train.steps=200", "output.checkpoint_every=1", "output.keep_checkpoints=2",
                         "--quiet"))
    try:
        wait_for(proc, lambda: len(train_steps(out)) >= 2)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        text = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, text[-3000:]
    assert "pgzoo: stopped: SIGINT received: stopped after step" in text and "--resume" in text
    import transformers

    transformers.AutoModelForCausalLM.from_pretrained(latest_checkpoint(out))  # the newest checkpoint loads
