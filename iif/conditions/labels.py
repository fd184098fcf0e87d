"""``labels``: class labels drawn uniformly from a list (class-conditional base models and rewards)."""
from __future__ import annotations

import torch

from iif.conditions.base import ConditionSource

Tensor = torch.Tensor


class ClassLabels(ConditionSource):
    """``c ~ Uniform(classes)``, ``[n]`` long.

    Args:
        classes: the labels to draw from (e.g. ``[0, 2, 4, 6, 8]``).
    """

    def __init__(self, classes):
        classes = [int(c) for c in classes]
        if not classes:
            raise ValueError("conditions.classes must list at least one class label")
        self.classes = torch.tensor(classes, dtype=torch.long)

    def sample(self, n: int) -> Tensor:
        return self.classes[torch.randint(len(self.classes), (n,))]
