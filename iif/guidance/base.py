"""The h-transform ("guidance", "control") in score units (docs/methods.md §0.1, §4.4)."""
from __future__ import annotations

import abc
from typing import ClassVar

import torch
from torch import nn

Tensor = torch.Tensor


class Guidance(nn.Module, abc.ABC):
    """``h(x_t, t | cond)``, added to the base score: the guided score is ``s_theta + h``.

    Built with ``base=`` (the frozen base model: sample shape, schedule) and ``reward=`` besides its config keys.
    A trained guidance is zero at initialisation, so the fine-tuned model starts as the base.

    Attributes:
        requires: capabilities of the reward this parametrisation needs (checked at start-up).
    """

    requires: ClassVar[frozenset[str]] = frozenset()

    @abc.abstractmethod
    def forward(self, x: Tensor, t: Tensor, x0_hat: Tensor, cond: Tensor | None = None) -> Tensor:
        """``x [B, *shape]``, ``t [B]``, the frozen base's Tweedie estimate ``x0_hat [B, *shape]``, the condition
        ``cond [B, ...]`` or None -> ``h [B, *shape]`` in score units."""
