"""Verifiable-reward tasks: problems with reference answers, a verifier and a binary reward.

    import pgzoo.tasks
    task = pgzoo.tasks.get("arithmetic", max_digits=2)
    problems = task.sample(64, split="train", seed=0)
    rewards = [task.reward(c, p) for c, p in zip(completions, problems)]

Built in: ``arithmetic`` (embedded, tunable difficulty), ``scratchpad`` (addition worked column by column: long
responses) and ``math`` (a user's JSONL file). Register your own with
``@pgzoo.tasks.register("name")`` on a :class:`Task` subclass.
"""

from pgzoo.tasks.base import Problem, Task, available, get, register, split_of, unregister
from pgzoo.tasks.arithmetic import ArithmeticTask  # importing a task's module registers it
from pgzoo.tasks.math import MathTask
from pgzoo.tasks.scratchpad import ScratchpadAdditionTask

__all__ = ["Problem", "Task", "ArithmeticTask", "MathTask", "ScratchpadAdditionTask", "available", "get", "register", "unregister", "split_of"]
