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
        t_max: the largest sampling time (``alpha(1) = 0`` makes the noisiest state carry no signal, which is fine
            for sampling; a smaller ``t_max`` keeps ``x0_hat`` finite at the first step).
    """

    def __init__(self, t_max: float = 1.0):
        if not 0 < t_max <= 1:
            raise ValueError(f"rectified flow needs 0 < t_max <= 1, got {t_max}")
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
