"""``prompts``: text prompts drawn uniformly from a list; a condition is the prompt's index into :attr:`texts`
(text-to-image base models encode ``texts[cond]``; prompt-aware rewards read the same list)."""
from __future__ import annotations

import torch

from iif.conditions.base import ConditionSource

Tensor = torch.Tensor


class Prompts(ConditionSource):
    """``i ~ Uniform(0..len(prompts)-1)``, ``[n]`` long.

    Args:
        prompts: the prompt list.
    """

    def __init__(self, prompts):
        self.texts = [str(p) for p in prompts]
        if not self.texts:
            raise ValueError("conditions.prompts must list at least one prompt")

    def sample(self, n: int) -> Tensor:
        return torch.randint(len(self.texts), (n,))

    def text(self, cond: Tensor) -> list[str]:
        """The prompts of a batch of conditions ``[n]``."""
        return [self.texts[int(i)] for i in cond]
