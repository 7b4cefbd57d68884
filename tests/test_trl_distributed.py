"""pgzoo.adapters.trl under data parallelism: 2 CPU processes (gloo DDP through accelerate), GA = 2, with and without R2.

The test launches this file with ``torch.distributed.run``; each rank trains the tiny MoE with the adapter and saves
what its loss saw and the gradient DDP averaged. The parent then checks that gradient against the objective on the
union of both ranks' micro-batches, computed naively in one process: the adapter's num_processes scaling and the
gathered global counts are what make the two equal.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
RUNS = {"dapo": ("dapo", None), "minirl-r2": ("minirl", "R2")}  # token-mean; seq-mean-token-sum with R2


def worker(out_dir: str) -> None:
    sys.path.insert(0, str(HERE))
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    torch.set_num_threads(1)
    import test_trl as T

    import pgzoo
    from pgzoo.models import build_tiny_moe, build_tokenizer

    rank = int(os.environ["RANK"])
    tok = build_tokenizer()
    base = build_tiny_moe(vocab_size=len(tok), seed=0)
    for run, (name, routing) in RUNS.items():
        trainer = T.run_spy(Path(out_dir) / f"run-{run}", base, tok, pgzoo.get(name), routing_replay=routing,
                            config={"max_steps": 2, "dataloader_num_workers": 0})
        assert trainer.accelerator.num_processes == 2
        if routing:
            assert trainer.last_layers_hit == 4
        torch.save(trainer.steps, Path(out_dir) / f"{run}-rank{rank}.pt")


@pytest.mark.slow
def test_gradient_equals_objective_across_two_processes(tmp_path):
    pytest.importorskip("trl")
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    with socket.socket() as sock:  # a free port: other test runs may share this machine
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), __file__, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]

    sys.path.insert(0, str(HERE))
    import test_trl as T

    import pgzoo
    from pgzoo.models import build_tiny_moe, build_tokenizer

    tok = build_tokenizer()
    base = build_tiny_moe(vocab_size=len(tok), seed=0)
    for run, (name, routing) in RUNS.items():
        ranks = [torch.load(tmp_path / f"{run}-rank{r}.pt", weights_only=False) for r in range(2)]
        assert len(ranks[0]) == len(ranks[1]) == 2
        for k in range(2):
            s0, s1 = ranks[0][k], ranks[1][k]
            for n in s0["grads"]:  # DDP averaged: both ranks hold the same gradient
                assert torch.allclose(s0["grads"][n], s1["grads"][n], atol=1e-7)
            local = [int(mb["completion_mask"].sum()) for mb in s0["window"] + s1["window"]]
            assert len(set(local)) > 1  # ranks and micro-batches hold different token counts
            union = {"window": s0["window"] + s1["window"], "params": s0["params"]}
            ref, _ = T.reference_gradient(base, union, pgzoo.get(name), T.MAX_LEN, routes_mode=routing)
            err = T.relative_error(s0["grads"], ref)
            assert err < 1e-4, f"{run} step {k}: relative gradient error {err:.2e} across 2 processes"


if __name__ == "__main__":
    worker(sys.argv[1])
