"""Several machines: a run that cannot have them stops at once; one that waits for them says what it waits for and
gives up after `train.dist_timeout` (real `pgzoo train` processes)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from _train_helpers import subprocess_env
from pgzoo.adapters.lightning.distributed import check_launcher, launcher, rendezvous_notice
from pgzoo.errors import ConfigError

DRY = ["rollout.engine=transformers", "eval.before=false", "eval.after=false", "output.progress_bar=false"]


def test_launcher_is_read_from_the_environment(monkeypatch):
    for key in ("TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE", "SLURM_NTASKS", "SLURM_PROCID", "MASTER_ADDR", "NODE_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert launcher() is None
    check_launcher(1)
    with pytest.raises(ConfigError, match=r"train.num_nodes=2.*torchrun.*SLURM.*NODE_RANK"):
        check_launcher(2)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("NODE_RANK", "1")
    assert launcher() == "lightning"
    check_launcher(2)
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert launcher() == "slurm"
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert launcher() == "torchrun"


def test_rendezvous_notice_speaks_until_the_group_exists(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "10.1.2.3")
    monkeypatch.setenv("MASTER_PORT", "29555")
    monkeypatch.setenv("NODE_RANK", "1")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    said = []
    with rendezvous_notice(4, 2, 60.0, every=0.05, say=said.append):
        time.sleep(0.3)
    n = len(said)
    assert n >= 2 and "waiting for the 4 ranks of 2 machine(s) to join at 10.1.2.3:29555" in said[0]
    assert "this is machine 1" in said[0] and "train.dist_timeout=60 s" in said[0]
    time.sleep(0.2)
    assert len(said) == n  # quiet once the block is left
    with rendezvous_notice(1, 1, 60.0, every=0.05, say=said.append):  # one process: nothing to wait for
        time.sleep(0.15)
    monkeypatch.setenv("LOCAL_RANK", "1")  # one process per machine speaks
    with rendezvous_notice(4, 2, 60.0, every=0.05, say=said.append):
        time.sleep(0.15)
    assert len(said) == n


def test_two_nodes_without_a_launcher_stop_at_once(tmp_path):
    env = {k: v for k, v in subprocess_env(OMP_NUM_THREADS="1").items()
           if k not in ("MASTER_ADDR", "NODE_RANK", "TORCHELASTIC_RUN_ID", "SLURM_NTASKS")}
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "pgzoo", "train", "tiny/minirl", "train.num_nodes=2",
                          f"output.dir={tmp_path / 'run'}", "model.path=/nonexistent", *DRY],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "train.num_nodes=2, but this process was not started as one machine" in out.stderr
    assert time.monotonic() - t0 < 60


@pytest.mark.slow
def test_a_machine_waiting_for_the_others_says_so_and_gives_up(tmp_path):
    from pgzoo.models import fresh_tiny_checkpoint

    ckpt = fresh_tiny_checkpoint(tmp_path / "tiny")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = subprocess_env(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK="0")
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "pgzoo", "train", "tiny/minirl", "train.num_nodes=2",
                          "train.dist_timeout=8", "train.steps=2", f"model.path={ckpt}",
                          f"output.dir={tmp_path / 'run'}", *DRY, "--quiet"],
                         env=env, capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode != 0, text[-3000:]
    assert "waiting for the 2 ranks of 2 machine(s) to join at 127.0.0.1:" + str(port) in text, text[-3000:]
    assert "this is machine 0" in text and "train.dist_timeout=8 s" in text
    assert time.monotonic() - t0 < 240
