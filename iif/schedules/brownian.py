"""``brownian``: the Brownian-bridge path of a Brownian base with a point start (adjoint sampling's reference process;
docs/tilting.md §1, "The Brownian base").

In generative time ``tau = 1 - t`` the base is ``X_0 = 0``, ``dX = sigma_B dB``, so ``X_tau ~ N(0, nu_tau I)`` with
``nu_tau = nu_1 tau`` (``nu_1 = sigma_B^2``), and given its endpoint ``X_1 = x_0`` the path is the Brownian bridge

    ``X_tau | X_1 ~ N((nu_tau / nu_1) X_1, nu_tau (nu_1 - nu_tau) / nu_1 I)``,

i.e. the Gaussian path ``alpha(t) = 1 - t``, ``sigma(t)^2 = nu_1 t (1 - t)``: both vanish at ``t = 1`` (the point
start), and the forward SDE with these marginals has the constant rate ``g^2 = nu_1``.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from iif.schedules.base import GaussianPath

Tensor = torch.Tensor


class BrownianBridge(GaussianPath):
    """``alpha(t) = 1 - t``, ``sigma(t) = sqrt(nu_1 t (1 - t))``, uniform sampling grid ``t_k = k / N``.

    Args:
        nu_1: the terminal variance ``sigma_B^2`` of the Brownian base (its data law is ``N(0, nu_1 I)``).
    """

    point_start: ClassVar[bool] = True

    def __init__(self, nu_1: float = 1.0):
        if not nu_1 > 0:
            raise ValueError(f"the Brownian base's terminal variance must be > 0, got {nu_1}")
        self.nu_1 = float(nu_1)

    def alpha(self, t: Tensor) -> Tensor:
        return 1 - t

    def sigma(self, t: Tensor) -> Tensor:
        return (self.nu_1 * t * (1 - t)).clamp(min=0).sqrt()

    def diffusion_sq(self, t: Tensor) -> Tensor:
        """``d sigma^2/dt - 2 sigma^2 d log alpha/dt = nu_1 (1 - 2t) + 2 nu_1 t = nu_1``."""
        return torch.full_like(t, self.nu_1)

    def d_alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return -torch.ones_like(t), self.nu_1 * (1 - 2 * t) / (2 * self.sigma(t).clamp(min=1e-12))

    def grid(self, n_steps: int, spacing: str = "leading") -> Tensor:
        self._check_steps(n_steps, spacing)
        return torch.linspace(0, 1, n_steps + 1, dtype=torch.float64)

    def __repr__(self) -> str:
        return f"BrownianBridge(nu_1={self.nu_1:g})"
