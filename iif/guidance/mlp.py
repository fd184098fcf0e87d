"""``mlp``: ``h(x, t) = NN1(x, x0_hat, t)``; needs no reward gradient (black-box rewards)."""
from __future__ import annotations

import math

import torch

from iif.guidance.base import Guidance
from iif.nn import TimeMLP

Tensor = torch.Tensor


class MLPGuidance(Guidance):
    """Plain MLP h-transform with a zero-initialised last layer (``h == 0`` at initialisation).

    For flat samples of ``D = prod(base.sample_shape)`` numbers (images are flattened); no condition input.

    Args:
        base: the frozen base model (its sample shape).
        reward: unused (every guidance is built with the same arguments).
        hidden, layers, t_dim: network size.
    """

    def __init__(self, base, reward=None, hidden: int = 128, layers: int = 3, t_dim: int = 32):
        super().__init__()
        self.shape = tuple(base.sample_shape)
        dim = math.prod(self.shape)
        self.nn1 = TimeMLP(2 * dim, dim, hidden=hidden, layers=layers, t_dim=t_dim, zero_init=True)

    def forward(self, x: Tensor, t: Tensor, x0_hat: Tensor, cond: Tensor | None = None) -> Tensor:
        return self.nn1(torch.cat([x.flatten(1), x0_hat.flatten(1)], dim=-1), t).view(x.shape)
