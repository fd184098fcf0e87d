"""The h-transform ("guidance", "control") in score units (METHODS.md §0.1, §4.4)."""
from __future__ import annotations

import abc
from typing import ClassVar

import torch
from torch import nn

Tensor = torch.Tensor


class Guidance(nn.Module, abc.ABC):
    """``h(x_t, t)``, added to the base score: the guided score is ``s_theta + h``.

    Attributes:
        requires: capabilities of the reward this parametrisation needs (checked at start-up).
    """

    requires: ClassVar[frozenset[str]] = frozenset()

    @abc.abstractmethod
    def forward(self, x: Tensor, t: Tensor, x0_hat: Tensor) -> Tensor:
        """``x [B, D]``, ``t [B]``, Tweedie estimate of the frozen base ``x0_hat [B, D]`` -> ``h [B, D]``."""
