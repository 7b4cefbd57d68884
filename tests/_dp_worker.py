"""One rank of the data-parallel equality test (tests/test_data_parallel.py): ``python _dp_worker.py STRATEGY OUT``
under torchrun-style environment variables. For each case, a Lightning Trainer with the strategy runs one global
step whose update is RLModule.update on this rank's rows of a fixed batch; rank 0 saves the consolidated weights."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

CASES = [("minirl", None), ("dapo", None), ("minirl", "R2"), ("dapo", "R2")]
WORLD = 2


def batch(seed: int = 0):
    """8 rows (2 mini-batches x 2 ranks x 2 rows) of synthetic rollouts with ragged prompts and completions."""
    from pgzoo.adapters.lightning.loop_data import RolloutBatch

    g = torch.Generator().manual_seed(seed)
    n, P, T = 8, 5, 6
    prompt_ids = torch.randint(4, 90, (n, P), generator=g)
    prompt_len = torch.randint(2, P + 1, (n,), generator=g)
    prompt_mask = torch.arange(P)[None] >= (P - prompt_len)[:, None]
    prompt_ids = torch.where(prompt_mask, prompt_ids, torch.zeros_like(prompt_ids))
    comp_len = torch.tensor([6, 1, 3, 5, 2, 6, 4, 1])
    completion_mask = torch.arange(T)[None] < comp_len[:, None]
    completion_ids = torch.where(completion_mask, torch.randint(4, 90, (n, T), generator=g), torch.zeros(n, T).long())
    mu = torch.where(completion_mask, -torch.rand(n, T, generator=g) * 3 - 2, torch.zeros(n, T))
    adv = torch.randn(n, generator=g)
    return RolloutBatch(prompt_ids, prompt_mask, completion_ids, completion_mask, mu, adv, adv.clone(),
                        torch.zeros(n, dtype=torch.bool))


def rank_rows(rank: int, world: int = WORLD, n: int = 8, num_minibatches: int = 2) -> list[int]:
    """The rows rank ``rank`` holds: its share of every mini-batch, as the loop shards prompts whole."""
    per_mb = n // num_minibatches
    share = per_mb // world
    return [m * per_mb + rank * share + i for m in range(num_minibatches) for i in range(share)]


def recipe(objective: str, replay: str | None, strategy: str = "auto", devices: int = 1):
    from pgzoo.recipes import recipe_from_dict

    return recipe_from_dict({"objective": {"name": objective},
                             "rollout": {"prompts_per_step": 4, "group_size": 2, "max_new_tokens": 6},
                             "train": {"num_minibatches": 2, "micro_batch_size": 1, "lr": 1.0, "grad_clip": None,
                                       "routing_replay": replay, "strategy": strategy, "devices": devices}})


def module(objective: str, replay: str | None, strategy: str = "auto", devices: int = 1, data=None):
    """An RLModule with plain SGD (Adam's first step is ~lr·sign(g): it would turn rounding noise in near-zero
    gradients into lr-sized differences; SGD shows the gradient itself). ``data``: what training_step updates on."""
    import pgzoo
    from pgzoo.adapters.lightning.module import RLModule
    from pgzoo.models import build_tiny_moe

    class SGDModule(RLModule):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.policy.parameters(), lr=self.tr.lr)
            return [opt], [torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)]

        def training_step(self, step, batch_idx):
            self.metrics = self.update(self.data.to(self.device))

    torch.manual_seed(0)
    m = SGDModule(build_tiny_moe(vocab_size=100, seed=0), None, pgzoo.get(objective), None, None,
                  recipe(objective, replay, strategy, devices))
    m.data = data
    return m


def main(strategy: str, out: str) -> None:
    import os

    import lightning as L

    from pgzoo.adapters.lightning.loop_data import RolloutBatch, step_loader
    from pgzoo.adapters.lightning.distributed import full_state_dict, trainer_parallelism, world

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    rows = torch.tensor(rank_rows(rank))
    full = batch()
    mine = RolloutBatch(**{k: (v[rows] if isinstance(v, torch.Tensor) else v) for k, v in full.__dict__.items()})
    for objective, replay in CASES:
        m = module(objective, replay, strategy, WORLD, mine)
        trainer = L.Trainer(**trainer_parallelism(m.recipe), max_epochs=1, logger=False, enable_checkpointing=False,
                            enable_model_summary=False, enable_progress_bar=False, use_distributed_sampler=False,
                            num_sanity_val_steps=0)
        trainer.fit(m, train_dataloaders=step_loader(0, 1))
        assert world() == (WORLD, rank)
        state = full_state_dict(m.policy)  # collective under FSDP
        if rank == 0:
            torch.save({"state": state, "metrics": m.metrics}, Path(out) / f"{strategy}-{objective}-{replay}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
