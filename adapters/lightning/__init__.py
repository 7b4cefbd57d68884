"""pgzoo's own trainer: a GRPO-style loop on PyTorch Lightning, and everything about a run of it.

==============  ======================================================================================
module          what it holds
==============  ======================================================================================
``run``         :func:`run.train`: a recipe end to end (the runbook of ``pgzoo train``)
``module``      :class:`module.RLModule`: one global step (rollout, rewards, advantages, updates, sync)
``loop_data``   a step's rows on the device, their lengths, metric accumulation, the step loader
``checkpoint``  Hugging Face checkpoints with the trainer state (atomic, verified, sharded optimizers)
``lora``        PEFT LoRA policies: loading, merged tensors, adapter-only optimizers
``distributed`` ranks, strategy (DDP / FSDP2 through Lightning), global sums
``run_folder``  the run folder's files: metrics.csv, eval.json, summary.json, plots, loggers
``resume``      ``--resume``: the checkpoint to start from, the recorded recipe, kept metrics rows
``signals``     SIGINT / SIGTERM: every rank stops after the same step with a checkpoint
``guards``      divergence guards (``train.stop_on``)
==============  ======================================================================================

Lightning is imported lazily: ``pgzoo train --help`` does not load it.
"""
