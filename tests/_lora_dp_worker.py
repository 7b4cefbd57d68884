"""One rank of the LoRA data-parallel equality test (tests/test_train_lora_parallel.py): ``python _lora_dp_worker.py
STRATEGY OUT`` under torchrun-style environment variables. Like tests/_dp_worker.py, with the tiny MoE wrapped in
LoRA adapters (attention modules and the fused experts; base parameters frozen): one global step of
RLModule.update on this rank's rows, then rank 0 saves the effective weights W + (α/r)·B·A and the adapters."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import _dp_worker as W  # noqa: E402

CASES = [("minirl", None), ("dapo", "R2")]


def lora_section():
    from pgzoo.recipes.sections import LoraSection

    return LoraSection(r=4, alpha=8.0, target_modules=["q_proj", "v_proj", "o_proj"],
                       target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])


def module(objective: str, replay: str | None, strategy: str = "auto", devices: int = 1, data=None):
    """W.module's SGD RLModule on a LoRA policy whose B matrices start random (seeded), so both A and B move."""
    from pgzoo.adapters.lightning.lora import trainable_parameters, wrap_policy

    m = W.module(objective, replay, strategy, devices, data)
    m.policy = wrap_policy(m.policy, lora_section())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in m.policy.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    m.configure_optimizers = lambda: _sgd(trainable_parameters(m.policy), m.tr.lr)
    return m


def _sgd(params, lr):
    opt = torch.optim.SGD(params, lr=lr)
    return [opt], [torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)]


def snapshot(policy) -> dict:
    """Effective weights (collective under FSDP) and, on rank 0, the adapter tensors."""
    from pgzoo.adapters.lightning.lora import effective_state_dict
    from pgzoo.adapters.lightning.distributed import full_state_dict

    eff = effective_state_dict(policy)
    full = full_state_dict(policy)
    return {"effective": {k: v.clone() for k, v in eff.items()},  # copies: the unsharded tensors are the model's
            "adapters": {k: v.clone() for k, v in full.items() if "lora_" in k}}


def main(strategy: str, out: str) -> None:
    import os

    import lightning as L

    from pgzoo.adapters.lightning.loop_data import RolloutBatch, step_loader
    from pgzoo.adapters.lightning.distributed import trainer_parallelism, world

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    rows = torch.tensor(W.rank_rows(rank))
    full = W.batch()
    mine = RolloutBatch(**{k: (v[rows] if isinstance(v, torch.Tensor) else v) for k, v in full.__dict__.items()})
    for objective, replay in CASES:
        m = module(objective, replay, strategy, W.WORLD, mine)
        trainer = L.Trainer(**trainer_parallelism(m.recipe), max_epochs=1, logger=False, enable_checkpointing=False,
                            enable_model_summary=False, enable_progress_bar=False, use_distributed_sampler=False,
                            num_sanity_val_steps=0)
        trainer.fit(m, train_dataloaders=step_loader(0, 1))
        assert world() == (W.WORLD, rank)
        snap = snapshot(m.policy)
        if objective == "minirl":  # a checkpoint written by every rank (FSDP: gathered adapter + merged weights)
            from pgzoo.adapters.lightning.checkpoint import save_checkpoint

            save_checkpoint(m, Path(out) / f"ckpt-{strategy}", 0)
        if rank == 0:
            torch.save({**snap, "metrics": m.metrics}, Path(out) / f"{strategy}-{objective}-{replay}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
