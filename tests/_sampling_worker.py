"""One gloo rank of tests/test_dapo_sampling.py::test_two_gloo_ranks_hold_the_one_process_groups:
``python _sampling_worker.py OUT ROUTES`` under torchrun-style environment variables. Runs dynamic sampling on the
fake task and engine as rank RANK of 2 and writes the groups it holds, their problems and the metrics."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _sampling_fakes import FakeTask, fake_draw, rows_by_group  # noqa: E402


def main(out: str, routes: bool) -> None:
    from pgzoo.adapters.lightning.sampling import sample_groups

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    draw, _ = fake_draw(2, routes=routes)
    got = sample_groups(FakeTask(), draw, step=5, step_seed=1234, prompts=4, group_size=2, max_draws=10)
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "groups": rows_by_group(got.rollouts, got.rewards, 2), "problems": [p.prompt for p in got.problems],
        "metrics": got.metrics}))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] == "1")
    os._exit(0)
