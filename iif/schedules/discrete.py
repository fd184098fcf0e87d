"""``discrete``: a DDPM training schedule of ``T`` steps held as ``alphas_cumprod`` (docs/methods.md §0.2), as
diffusers' schedulers hold it, so a pretrained diffusers model runs on the schedule it was trained with.

The state at diffusers timestep ``k in 0..T-1`` has ``alphabar = alphas_cumprod[k]`` and time ``t = (k + 1) / T``;
``t = 0`` (timestep -1) is clean data, ``alphabar = 1`` (diffusers' ``set_alpha_to_one``). Times off this grid
are rounded to it, for the coefficients and the network's timestep alike.
"""
from __future__ import annotations

import numpy as np
import torch

from iif.schedules.base import GaussianPath

Tensor = torch.Tensor


class DiscreteSchedule(GaussianPath):
    """A discrete variance-preserving schedule.

    Args:
        num_train_timesteps: ``T``.
        beta_start, beta_end, beta_schedule: ``linear`` (``betas = linspace(beta_start, beta_end, T)``) or
            ``scaled_linear`` (``linspace(sqrt(beta_start), sqrt(beta_end), T)^2``, Stable Diffusion's), as in
            diffusers; ignored when ``alphas_cumprod`` is given.
        alphas_cumprod: ``[T]`` the schedule itself (e.g. read from a pretrained model's scheduler config).
    """

    variance_preserving = True

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 beta_schedule: str = "linear", alphas_cumprod=None):
        if alphas_cumprod is None:
            if num_train_timesteps < 2 or not 0 < beta_start < beta_end < 1:
                raise ValueError(f"discrete schedule needs num_train_timesteps >= 2 and 0 < beta_start < beta_end < 1, "
                                 f"got {num_train_timesteps}, {beta_start}, {beta_end}")
            # float32 as diffusers computes them, so alphas_cumprod equals a diffusers scheduler's bit for bit
            if beta_schedule == "linear":
                betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
            elif beta_schedule == "scaled_linear":
                betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float32) ** 2
            else:
                raise ValueError(f"base_model.schedule.beta_schedule must be linear or scaled_linear, got '{beta_schedule}'")
            alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.alphas_cumprod = torch.as_tensor(alphas_cumprod).to(torch.float64).cpu()
        self.T = self.alphas_cumprod.shape[0]
        self._padded = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod])  # index 0: t = 0

    def index(self, t: Tensor) -> Tensor:
        """Diffusers timestep ``k = round(t T) - 1`` of times ``t`` (``-1``: clean)."""
        return (torch.round(t.double() * self.T).long() - 1).clamp(-1, self.T - 1)

    def alphabar(self, t: Tensor) -> Tensor:
        return self._padded.to(t.device)[self.index(t) + 1]

    def alpha(self, t: Tensor) -> Tensor:
        return self.alphabar(t).sqrt()

    def sigma(self, t: Tensor) -> Tensor:
        return (1 - self.alphabar(t)).sqrt()

    def diffusion_sq(self, t: Tensor) -> Tensor:
        """``T beta_k`` with ``beta_k = 1 - alphabar_k / alphabar_{k-1}``: the VP-SDE rate of the step ending at ``t``."""
        i = self.index(t) + 1
        padded = self._padded.to(t.device)
        return self.T * (1 - padded[i] / padded[(i - 1).clamp(min=0)])

    def network_time(self, t: Tensor) -> Tensor:
        """The integer diffusers timestep (as a float tensor, what ``UNet2DModel`` takes)."""
        return self.index(t).clamp(min=0).to(t.dtype if t.is_floating_point() else torch.float32)

    def grid(self, n_steps: int, spacing: str = "leading", steps_offset: int = 0) -> Tensor:
        """Diffusers' timestep spacings (``DDIMScheduler.set_timesteps``) as times ``(k + 1) / T``, plus ``t_0 = 0``."""
        self._check_steps(n_steps, spacing)
        T = self.T
        if n_steps > T:
            raise ValueError(f"sampler.n_steps={n_steps} exceeds the schedule's {T} training timesteps")
        if spacing == "linspace":
            ks = np.linspace(0, T - 1, n_steps).round().astype(np.int64)
        elif spacing == "leading":
            ks = (np.arange(0, n_steps) * (T // n_steps)).round().astype(np.int64) + steps_offset
        else:  # trailing
            ks = np.round(np.arange(T, 0, -T / n_steps)).astype(np.int64)[::-1] - 1
        if len(set(ks.tolist())) != n_steps or ks.max() >= T:
            raise ValueError(f"spacing '{spacing}' with {n_steps} steps does not give distinct timesteps below {T}")
        return torch.cat([torch.zeros(1, dtype=torch.float64), torch.tensor(np.sort(ks) + 1, dtype=torch.float64) / T])

    def __repr__(self) -> str:
        return f"DiscreteSchedule(T={self.T})"
