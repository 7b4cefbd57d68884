"""Trainer adapters, installed as ``pgzoo.adapters``: ``pgzoo.adapters.trl`` (TRL's GRPOTrainer with a pgzoo
objective) and ``pgzoo.adapters.lightning`` (a GRPO-style LightningModule). Each imports its framework lazily."""
