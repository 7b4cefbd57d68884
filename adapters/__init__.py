"""Trainer adapters, installed as ``pgzoo.adapters``: one sub-package per trainer, siblings that never import each
other. ``pgzoo.adapters.trl`` (TRL's GRPOTrainer with a pgzoo objective) and ``pgzoo.adapters.lightning`` (pgzoo's
own Lightning trainer and its runs), ``pgzoo.adapters.verl`` (pgzoo's objectives as verl policy losses, loaded by verl
as a plugin). Each imports its framework lazily."""
