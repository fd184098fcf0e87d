"""``rectified_flow``: the linear interpolation path ``x_t = (1 - t) x_0 + t eps`` of rectified flow / flow
matching (SD3's), ``alpha = 1 - t``, ``sigma = t`` (docs/methods.md "Gaussian paths")."""
from __future__ import annotations

import torch

from iif.schedules.base import GaussianPath

Tensor = torch.Tensor


class RectifiedFlow(GaussianPath):
    """Rectified-flow path; the network's time is ``t`` (diffusers' flow models take ``1000 t``: their base model
    scales it).

    Args:
        t_max: the largest sampling time, below 1: at ``t = 1`` ``alpha = 0`` and a noise prediction no longer
            determines ``x0_hat`` (every sampler here works with ``eps``), so sampling starts at ``t_max`` from
            ``N(0, I)`` (an approximation of order ``1 - t_max``).
    """

    def __init__(self, t_max: float = 0.999):
        if not 0 < t_max < 1:
            raise ValueError(f"base_model.schedule.t_max must lie in (0, 1) for rectified flow, got {t_max}")
        self.t_max = float(t_max)

    def alpha(self, t: Tensor) -> Tensor:
        return 1 - t

    def sigma(self, t: Tensor) -> Tensor:
        return t

    def diffusion_sq(self, t: Tensor) -> Tensor:
        """``2 t / (1 - t)``."""
        return 2 * t / (1 - t)

    def d_alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return -torch.ones_like(t), torch.ones_like(t)

    def grid(self, n_steps: int, spacing: str = "leading") -> Tensor:
        """The uniform grid ``t_max k / N`` (every spacing: the path is continuous)."""
        self._check_steps(n_steps, spacing)
        return self.t_max * torch.arange(n_steps + 1, dtype=torch.float64, device="cpu") / n_steps
