"""The VP-SDE noise schedule and its exact DDPM discretisation (METHODS.md §0.1–0.2).

Continuous: ``beta(t) = beta_min + t (beta_max - beta_min)``, ``t in [0, 1]``,
``m(t) = exp(-t^2 (beta_max - beta_min) / 4 - t beta_min / 2)``, ``v(t) = sqrt(1 - m(t)^2)``,
so that ``x_t = m(t) x_0 + v(t) eps``.

Discrete (N steps on the uniform grid ``t_k = k / N``): ``alphabar_k = m(t_k)^2`` (exact marginals at the grid
points, so one network trained in continuous time serves every N), ``alpha_k = alphabar_k / alphabar_{k-1}``,
``beta_k = 1 - alpha_k``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class DiscreteSchedule:
    """Per-step coefficients, index ``k = 0..N`` (index 0 is clean data; entries ``[0]`` of alpha/beta unused).

    Attributes:
        t: ``[N+1]`` continuous times ``k / N``.
        alphabar, alpha, beta: ``[N+1]`` float64.
    """

    t: Tensor
    alphabar: Tensor
    alpha: Tensor
    beta: Tensor

    @property
    def n_steps(self) -> int:
        return self.t.shape[0] - 1


class VPSchedule:
    """Variance-preserving SDE ``dX = -beta(t) X / 2 dt + sqrt(beta(t)) dW`` on ``t in [0, 1]``."""

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

    def discretise(self, n_steps: int) -> DiscreteSchedule:
        if n_steps < 1:
            raise ValueError(f"number of sampling steps must be >= 1, got {n_steps}")
        t = torch.arange(n_steps + 1, dtype=torch.float64, device="cpu") / n_steps  # read as Python numbers
        alphabar = self.m(t) ** 2
        alpha = torch.ones_like(alphabar)
        alpha[1:] = alphabar[1:] / alphabar[:-1]
        return DiscreteSchedule(t=t, alphabar=alphabar, alpha=alpha, beta=1 - alpha)

    def __repr__(self) -> str:
        return f"VPSchedule(beta_min={self.beta_min}, beta_max={self.beta_max})"


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0, scale: float = 1000.0) -> Tensor:
    """Sinusoidal embedding of continuous times ``t [B] in [0, 1]`` -> ``[B, dim]``.

    Frequencies ``scale * max_period^(-i / (dim/2))``; ``scale = 1000`` is DDPM's (integer steps).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = scale * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
