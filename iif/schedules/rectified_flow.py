"""``rectified_flow``: the linear interpolation path ``x_t = (1 - t) x_0 + t eps`` of rectified flow / flow
matching (SD3's), ``alpha = 1 - t``, ``sigma = t`` (docs/methods.md "Gaussian paths"), with an optional time shift of
the sampling grid (SD3's scheduler: ``shift = 3``)."""
from __future__ import annotations

import torch

from iif.schedules.base import GaussianPath

Tensor = torch.Tensor


class RectifiedFlow(GaussianPath):
    """Rectified-flow path; the network's time is ``t`` (diffusers' flow models take ``1000 t``: their base model
    scales it).

    The sampling grid is uniform in ``u`` and mapped to times by the time shift of diffusers'
    ``FlowMatchEulerDiscreteScheduler`` (``shift`` in its config; SD3: 3), which puts more steps at high noise:

    1. ``u_k = u_max k / N``, ``k = 0..N``, with ``u_max = shift^-1(t_max)``
    2. ``t_k = shift(u_k) = shift u_k / (1 + (shift - 1) u_k)``      (``shift = 1``: ``t_k = t_max k / N``)

    so the grid runs from ``t_0 = 0`` to ``t_N = t_max``. The shift changes only the grid, not the path:
    ``sigma(t) = t`` is diffusers' (shifted) ``sigma``, and the network's timestep ``1000 t`` is diffusers'
    ``1000 sigma``.
    Unlike diffusers' default grid (``shift(linspace(1, shift(1/1000), N))`` then 0: it starts at ``sigma = 1``,
    where ``alpha = 0``, and ends with a small step from ``shift(shift(1/1000))`` to 0), this grid starts at
    ``t_max`` and is uniform in ``u`` down to 0.

    Args:
        t_max: the largest sampling time, below 1: at ``t = 1`` ``alpha = 0`` and a noise prediction no longer
            determines ``x0_hat`` (every sampler here works with ``eps``), so sampling starts at ``t_max`` from
            ``N(0, I)`` (an approximation of order ``1 - t_max``).
        shift: the grid's time shift (> 0; 1: the uniform grid).
    """

    def __init__(self, t_max: float = 0.999, shift: float = 1.0):
        if not 0 < t_max < 1:
            raise ValueError(f"base_model.schedule.t_max must lie in (0, 1) for rectified flow, got {t_max}")
        if not shift > 0:
            raise ValueError(f"base_model.schedule.shift must be > 0, got {shift}")
        self.t_max, self.shift = float(t_max), float(shift)

    def alpha(self, t: Tensor) -> Tensor:
        return 1 - t

    def sigma(self, t: Tensor) -> Tensor:
        return t

    def diffusion_sq(self, t: Tensor) -> Tensor:
        """``2 t / (1 - t)``."""
        return 2 * t / (1 - t)

    def d_alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return -torch.ones_like(t), torch.ones_like(t)

    def time_shift(self, u: Tensor) -> Tensor:
        """``shift u / (1 + (shift - 1) u)``: diffusers' ``FlowMatchEulerDiscreteScheduler`` shift of its sigmas."""
        return self.shift * u / (1 + (self.shift - 1) * u)

    def inverse_time_shift(self, t: Tensor) -> Tensor:
        """``u = t / (shift - (shift - 1) t)``, the inverse of :meth:`time_shift`."""
        return t / (self.shift - (self.shift - 1) * t)

    def grid(self, n_steps: int, spacing: str = "leading", steps_offset: int = 0) -> Tensor:
        """``t_k = shift(u_max k / N)``, ``k = 0..N``, from 0 to ``t_max``; ``spacing`` and ``steps_offset`` (a
        discrete schedule's) are ignored: the path is continuous."""
        self._check_steps(n_steps, spacing)
        u_max = self.inverse_time_shift(torch.tensor(self.t_max, dtype=torch.float64))
        t = self.time_shift(u_max * torch.arange(n_steps + 1, dtype=torch.float64, device="cpu") / n_steps)
        t[-1] = self.t_max  # exactly, whatever the rounding of shift(shift^-1(t_max))
        return t

    def __repr__(self) -> str:
        return f"RectifiedFlow(t_max={self.t_max}, shift={self.shift})"
