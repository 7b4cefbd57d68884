"""TRL's ``GRPOTrainer`` with any pgzoo objective as its loss (tested with TRL 1.16).

    import pgzoo
    from pgzoo.adapters.trl import GRPOTrainer, EngineRollout
    trainer = GRPOTrainer(loss=pgzoo.get("minirl"), model=model, reward_funcs=reward, args=GRPOConfig(...),
                          train_dataset=dataset)

Modules: ``trainer`` (the trainer subclass and its loss), ``rollout`` (:class:`EngineRollout`: a pgzoo rollout
engine as TRL's ``rollout_func``), ``config`` (TRL's loss settings as pgzoo objective options), ``checks`` (what the
adapter refuses, and why). Guide: docs/trl.md.
"""

from pgzoo.adapters.trl.rollout import EngineRollout
from pgzoo.adapters.trl.trainer import GRPOTrainer

__all__ = ["GRPOTrainer", "EngineRollout"]
