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

    def feature_dim(self, sample_shape: tuple[int, ...]) -> int:
        """``len(texts)``: one column per prompt."""
        return len(self.texts)

    def features(self, cond: Tensor) -> Tensor:
        """``[B, len(texts)]``: the one-hot of each prompt index (float32, on ``cond``'s device).

        DPOK feeds its value network the CLIP text embedding of the prompt. For a fixed prompt list a one-hot is
        equivalent for the value network: its first linear layer learns one vector per prompt (whatever the layer
        would map that prompt's embedding to), and the value is never evaluated on a prompt outside the list."""
        idx = cond.reshape(-1).long()
        if bool(((idx < 0) | (idx >= len(self.texts))).any()):
            raise ValueError(f"prompt indices must lie in [0, {len(self.texts)}), got {sorted(set(idx.tolist()))}")
        return torch.nn.functional.one_hot(idx, len(self.texts)).float()

    def text(self, cond: Tensor) -> list[str]:
        """The prompts of a batch of conditions ``[n]``."""
        return [self.texts[int(i)] for i in cond]
