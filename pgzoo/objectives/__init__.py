"""The objective zoo: one module per family; importing this package registers every built-in objective."""

from pgzoo.objectives.base import AGGREGATIONS, Objective, ObjectiveOutput, aggregate

__all__ = ["AGGREGATIONS", "Objective", "ObjectiveOutput", "aggregate"]
