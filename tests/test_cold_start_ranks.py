"""Several ranks (torchrun, SLURM, Lightning's launcher) each resolve the embedded model's cold start into the same
cache entry at the same moment: one trains it, the others wait on the entry's lock and load what it wrote."""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.slow
SETTINGS = dict(max_steps=10, eval_every=1, final_eval_n=8, eval_n=16, batch_size=16)


def _rank(rank: int, cache: str, start, queue) -> None:
    import torch

    from pgzoo.models.cold_start import ensure_cold_start

    torch.set_num_threads(1)
    logged: list[str] = []  # the training loop logs its tenth step (10 x eval_every)
    start.wait(timeout=120)  # every rank asks at once
    path = ensure_cold_start("arithmetic", {"max_digits": 1}, seed=2, cache_dir=cache, log=logged.append, **SETTINGS)
    st = os.stat(os.path.join(path, "model.safetensors"))
    queue.put((rank, str(path), bool(logged), st.st_ino))


def test_concurrent_ranks_train_the_cold_start_once(tmp_path):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue, start = ctx.Queue(), ctx.Barrier(2)
    procs = [ctx.Process(target=_rank, args=(r, str(tmp_path), start, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert len({path for _, path, _, _ in results}) == 1
    assert sum(trained for _, _, trained, _ in results) == 1  # one rank trained, the others loaded its entry
    assert len({ino for *_, ino in results}) == 1  # nobody replaced the entry after another had read it
    entries = [p.name for p in (tmp_path / "cold-start").iterdir() if not p.name.endswith(".lock")]
    assert entries == [os.path.basename(results[0][1])]  # no temporary folder left behind
