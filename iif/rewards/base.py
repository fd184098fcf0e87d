"""Rewards ``r(x)`` and the tilt ``r(x) / lambda`` (METHODS.md §0.3)."""
from __future__ import annotations

import abc
from typing import ClassVar

import torch

Tensor = torch.Tensor


class RewardError(RuntimeError):
    """A reward returned values that cannot be used (NaN or infinite)."""


class Reward(abc.ABC):
    """A reward on clean samples.

    Subclasses implement :meth:`__call__` (the raw reward). Methods use :meth:`log_tilt`, the exponent of the
    tilted target ``p_tilt ∝ p_data exp(r / lambda)``, and :meth:`grad_log_tilt`.

    Args:
        temperature: ``lambda > 0``.
        name: shown in error messages.

    Attributes:
        differentiable: whether :meth:`grad_log_tilt` is available.
    """

    differentiable: ClassVar[bool] = True

    def __init__(self, temperature: float = 1.0, name: str | None = None):
        if not temperature > 0:
            raise ValueError(f"reward temperature lambda must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.name = name or type(self).__name__

    @abc.abstractmethod
    def __call__(self, x: Tensor) -> Tensor:
        """Raw reward ``r(x)``: ``[B, *shape] -> [B]``."""

    def log_tilt(self, x: Tensor) -> Tensor:
        """``r(x) / lambda`` ``[B]``, checked finite (a NaN here would silently poison the weights)."""
        r = self(x)
        bad = ~torch.isfinite(r)
        if bad.any():
            raise RewardError(f"reward '{self.name}' returned {int(bad.sum())} non-finite values "
                              f"(NaN/inf) out of {r.numel()}; first bad input: {x[bad][0].tolist()}")
        return r / self.temperature

    def grad_log_tilt(self, x: Tensor) -> Tensor:
        """``grad_x r(x) / lambda`` ``[B, *shape]`` by autograd (no graph is kept)."""
        if not self.differentiable:
            raise TypeError(f"reward '{self.name}' is not differentiable")
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self(x).sum(), x)
        return g / self.temperature
