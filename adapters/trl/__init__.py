"""TRL's ``GRPOTrainer`` and ``AsyncGRPOTrainer`` with any pgzoo objective as their loss (tested with TRL 1.16).

    import pgzoo
    from pgzoo.adapters.trl import GRPOTrainer, EngineRollout
    trainer = GRPOTrainer(loss=pgzoo.get("minirl"), model=model, reward_funcs=reward, args=GRPOConfig(...),
                          train_dataset=dataset)

    from pgzoo.adapters.trl import AsyncGRPOTrainer      # TRL's experimental trainer: a vLLM server, a GPU
    trainer = AsyncGRPOTrainer(loss=pgzoo.get("minirl"), model="Qwen/Qwen3-0.6B", reward_funcs=reward,
                               args=AsyncGRPOConfig(...), train_dataset=dataset)

Modules: ``trainer`` (``GRPOTrainer`` and its loss), ``async_trainer`` (``AsyncGRPOTrainer`` and its loss),
``rollout`` (:class:`EngineRollout`: a pgzoo rollout engine as TRL's ``rollout_func``), ``config`` (TRL's loss
settings as pgzoo objective options), ``checks`` (what the adapters refuse, and why), ``normalisers`` (the global
normalisers of an optimizer step), ``packed`` (the async trainer's packed loss terms as ``[B, T]`` rows),
``metrics`` (objective metrics reduced over processes for TRL's logs). Guide: docs/trl.md.

``AsyncGRPOTrainer`` is imported on first use: TRL's ``trl.experimental`` warns when it is imported, and only users
of the asynchronous trainer should see that.
"""

from pgzoo.adapters.trl.rollout import EngineRollout
from pgzoo.adapters.trl.trainer import GRPOTrainer

__all__ = ["GRPOTrainer", "AsyncGRPOTrainer", "EngineRollout"]


def __getattr__(name: str):
    if name == "AsyncGRPOTrainer":
        from pgzoo.adapters.trl.async_trainer import AsyncGRPOTrainer

        return AsyncGRPOTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
