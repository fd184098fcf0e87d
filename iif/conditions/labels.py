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

    def feature_dim(self, sample_shape: tuple[int, ...]) -> int:
        """``len(classes)``: one column per position in the list."""
        return len(self.classes)

    def features(self, cond: Tensor) -> Tensor:
        """``[B, len(classes)]``: the one-hot of each label's position in :attr:`classes` (float32, on ``cond``'s
        device); a label not in the list is a ValueError that names it."""
        match = cond.reshape(-1, 1) == self.classes.to(cond.device)[None]  # [B, len(classes)]
        found = match.any(1)
        if not bool(found.all()):
            unknown = sorted({int(c) for c in cond.reshape(-1)[~found].tolist()})
            raise ValueError(f"class label(s) {unknown} not in conditions.classes {self.classes.tolist()}")
        position = match.int().argmax(1)  # the first position of a label listed twice
        return torch.nn.functional.one_hot(position, len(self.classes)).float()
