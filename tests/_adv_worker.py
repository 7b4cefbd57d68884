"""One rank of tests/test_step_advantages.py: ``python _adv_worker.py OUT`` under torchrun-style environment variables
(gloo). For every case (each estimator the trainer runs, with its default options, and per-token ones with theirs),
this rank's advantages of a fixed step computed over the whole step (``step_advantages``) and, as the control, over
this rank's rows alone; saved to ``OUT/rank<r>.pt``."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

G, PROMPTS = 4, 6  # 6 prompts of 4 rows: 3 per rank on 2 ranks
# per-token cases, beside every trainer estimator with its defaults (label: (estimator, options))
TOKEN_CASES = {"reinforce++ gamma=0.9": ("reinforce++", {"gamma": 0.9})}


def cases() -> dict[str, tuple[str, dict]]:
    import pgzoo

    return {**{name: (name, {}) for name in pgzoo.advantages.trainer_estimators()}, **TOKEN_CASES}


def step_rows() -> tuple[torch.Tensor, torch.Tensor]:
    """The whole step in prompt order: 0/1 rewards (pass@k needs them) with groups of every kind, and lengths."""
    g = torch.Generator().manual_seed(0)
    rewards = (torch.rand(PROMPTS * G, generator=g) < 0.4).float()
    rewards[:G] = 1.0  # a group whose rewards all agree
    lengths = torch.randint(1, 30, (PROMPTS * G,), generator=g)
    return rewards, lengths


def rank_rows(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's rows: prompts rank, rank + W, ... (the trainer deals prompts round-robin)."""
    return x.view(PROMPTS, G, *x.shape[1:])[rank::world].reshape(-1, *x.shape[1:])


def width_of(lengths: torch.Tensor) -> int:
    """A rank's completion columns: its own longest completion plus a padding column (never the step's longest)."""
    return int(lengths.max()) + 1


def main(out: Path) -> None:
    import pgzoo
    from pgzoo.adapters.lightning.loop_data import prefix_mask, step_advantages

    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    rewards, lengths = step_rows()
    mine_r, mine_l = rank_rows(rewards, rank, world), rank_rows(lengths, rank, world)
    width = width_of(mine_l)
    result = {}
    for label, (name, options) in cases().items():  # remax needs greedy baseline rewards: not a trainer estimator
        per_token = "response_mask" in pgzoo.advantages.token_inputs(name)
        alone = pgzoo.advantages.compute(name, mine_r, group_size=G, lengths=mine_l, **options,
                                         response_mask=prefix_mask(mine_l, width) if per_token else None)
        result[label] = (step_advantages(name, mine_r, mine_l, G, width=width, options=options), alone)
    torch.save(result, out / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
