"""Condition sources (config group ``conditions``)."""
from iif.conditions.base import ConditionSource, Unconditional

__all__ = ["ConditionSource", "Unconditional"]
