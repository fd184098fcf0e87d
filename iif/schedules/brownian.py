"""``brownian``: the Brownian-bridge path of a Brownian base with a point start (adjoint sampling's reference process;
docs/tilting.md §1, "The Brownian base").

In generative time ``tau = 1 - t`` the base is ``X_0 = 0``, ``dX = sigma_B(tau) dB``, so ``X_tau ~ N(0, nu_tau I)`` with
``nu_tau = int_0^tau sigma_B^2``, and given its endpoint ``X_1 = x_0`` the path is the Brownian bridge

    ``X_tau | X_1 ~ N((nu_tau / nu_1) X_1, nu_tau (nu_1 - nu_tau) / nu_1 I)``,

i.e. the Gaussian path ``alpha(t) = nu_tau / nu_1``, ``sigma(t)^2 = nu_tau (nu_1 - nu_tau) / nu_1``: both vanish at
``t = 1`` (the point start), and the forward SDE with these marginals has the rate ``g^2 = d nu / d tau =
sigma_B(tau)^2``. Two noise schedules:

- constant ``sigma_B^2 = nu_1``: ``nu_tau = nu_1 tau``, ``alpha = 1 - t``, ``sigma^2 = nu_1 t (1 - t)``, ``g^2 = nu_1``;
- geometric (adjoint sampling's), ``sigma_B(tau) = sigma_min rho^(1 - tau) sqrt(2 log rho)`` with ``rho =
  sigma_max / sigma_min > 1``: ``nu_tau = sigma_min^2 (rho^2 - rho^(2 t))``, large steps first and small ones at the
  data end. ``sigma_min^2 = nu_1 / (rho^2 - 1)`` makes the data law ``N(0, nu_1 I)`` (``rho -> 1``: the constant one).
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch

from iif.schedules.base import GaussianPath

Tensor = torch.Tensor


class BrownianBridge(GaussianPath):
    """``alpha(t) = nu(t) / nu_1``, ``sigma(t) = sqrt(nu(t) (nu_1 - nu(t)) / nu_1)``, uniform sampling grid
    ``t_k = k / N`` (``nu(t)``: :meth:`nu`, the base's variance at generative time ``1 - t``).

    Args:
        nu_1: the data law's variance ``int_0^1 sigma_B^2`` (the Brownian base's data law is ``N(0, nu_1 I)``).
        noise_ratio: ``rho = sigma_max / sigma_min`` of the geometric schedule; 1: constant ``sigma_B``.
    """

    point_start: ClassVar[bool] = True

    def __init__(self, nu_1: float = 1.0, noise_ratio: float = 1.0):
        if not nu_1 > 0:
            raise ValueError(f"the Brownian base's terminal variance must be > 0, got {nu_1}")
        if not noise_ratio >= 1:
            raise ValueError(f"base_model.noise_ratio (sigma_max / sigma_min) must be >= 1, got {noise_ratio}")
        self.nu_1, self.noise_ratio = float(nu_1), float(noise_ratio)
        self._log_rho2 = 2 * math.log(self.noise_ratio)

    def _rho2t(self, t: Tensor) -> Tensor:
        """``rho^(2t) / (rho^2 - 1)`` scaled so that :meth:`nu` ``= nu_1 (rho^2 - rho^(2t)) / (rho^2 - 1)``."""
        return torch.exp(self._log_rho2 * t) / math.expm1(self._log_rho2)

    def nu(self, t: Tensor) -> Tensor:
        """``nu_tau`` at ``tau = 1 - t``: 0 at ``t = 1`` (the start), ``nu_1`` at ``t = 0`` (the data)."""
        if self.noise_ratio == 1:
            return self.nu_1 * (1 - t)
        return self.nu_1 * (math.exp(self._log_rho2) / math.expm1(self._log_rho2) - self._rho2t(t))

    def alpha(self, t: Tensor) -> Tensor:
        return self.nu(t) / self.nu_1

    def sigma(self, t: Tensor) -> Tensor:
        nu = self.nu(t)
        return (nu * (self.nu_1 - nu) / self.nu_1).clamp(min=0).sqrt()

    def diffusion_sq(self, t: Tensor) -> Tensor:
        """``g^2 = d sigma^2/dt - 2 sigma^2 d log alpha/dt = -d nu/dt = sigma_B(1 - t)^2``."""
        if self.noise_ratio == 1:
            return torch.full_like(t, self.nu_1)
        return self.nu_1 * self._log_rho2 * self._rho2t(t)

    def d_alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        d_nu = -self.diffusion_sq(t)
        nu = self.nu(t)
        return d_nu / self.nu_1, d_nu * (self.nu_1 - 2 * nu) / (2 * self.nu_1 * self.sigma(t).clamp(min=1e-12))

    def grid(self, n_steps: int, spacing: str = "leading") -> Tensor:
        self._check_steps(n_steps, spacing)
        return torch.linspace(0, 1, n_steps + 1, dtype=torch.float64)

    def __repr__(self) -> str:
        ratio = "" if self.noise_ratio == 1 else f", noise_ratio={self.noise_ratio:g}"
        return f"BrownianBridge(nu_1={self.nu_1:g}{ratio})"
