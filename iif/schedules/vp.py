"""``vp``: the variance-preserving SDE ``dX = -beta(t) X / 2 dt + sqrt(beta(t)) dW`` on ``t in [0, 1]``
(docs/methods.md §0.1).

``beta(t) = beta_min + t (beta_max - beta_min)``, ``alpha(t) = m(t) = exp(-t^2 (beta_max - beta_min) / 4 - t beta_min / 2)``,
``sigma(t) = v(t) = sqrt(1 - m(t)^2)``. Sampled on the uniform grid ``t_k = k / N`` (exact marginals at the grid
points, so one network trained in continuous time serves every ``N``).
"""
from __future__ import annotations

import torch

from iif.schedules.base import GaussianPath

Tensor = torch.Tensor


class VPSchedule(GaussianPath):
    """Continuous VP-SDE with a linear ``beta(t)``.

    Args:
        beta_min, beta_max: ``beta(0)`` and ``beta(1)``, ``0 < beta_min < beta_max``.
    """

    variance_preserving = True

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        if not 0 < beta_min < beta_max:
            raise ValueError(f"VP schedule needs 0 < beta_min < beta_max, got {beta_min}, {beta_max}")
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)

    def beta(self, t: Tensor) -> Tensor:
        """``beta(t) = g(t)^2``."""
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def m(self, t: Tensor) -> Tensor:
        """Mean coefficient of ``p_{t|0}``."""
        return torch.exp(-0.25 * t ** 2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min)

    def v(self, t: Tensor) -> Tensor:
        """Standard deviation of ``p_{t|0}`` (``sqrt(1 - m^2)``, computed stably)."""
        log_m2 = -0.5 * t ** 2 * (self.beta_max - self.beta_min) - t * self.beta_min
        return torch.sqrt(-torch.expm1(log_m2))

    alpha, sigma = m, v

    def diffusion_sq(self, t: Tensor) -> Tensor:
        return self.beta(t)

    def d_alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        m, v = self.m(t), self.v(t)
        dm = -0.5 * self.beta(t) * m
        return dm, -m * dm / v

    def grid(self, n_steps: int, spacing: str = "leading") -> Tensor:
        """The uniform grid ``k / N``: on a continuous-time path every diffusers spacing is this grid."""
        self._check_steps(n_steps, spacing)
        return torch.arange(n_steps + 1, dtype=torch.float64, device="cpu") / n_steps

    def __repr__(self) -> str:
        return f"VPSchedule(beta_min={self.beta_min}, beta_max={self.beta_max})"
