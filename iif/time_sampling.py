"""Distributions of the training time ``t`` in score-matching losses.

The minimiser of the denoising loss does not depend on how ``t`` is drawn (any positive weighting), but a finite
network trained by SGD does. The path KL between the guided chains is ``E int beta(t)/2 ||h - h*||^2 dt``
(Girsanov), so errors of ``h`` at large ``t`` (where ``beta`` is large and the modes are chosen) cost most;
:class:`BetaTime` draws ``t`` with density ``∝ beta(t)`` so the epsilon-weighted loss approximates that weighting.

Times are drawn on the CPU (from its random stream); the loss moves them to the run's device.
"""
from __future__ import annotations

import torch

from iif.schedules.base import GaussianPath
from iif.schedules.vp import VPSchedule

Tensor = torch.Tensor


class UniformTime:
    """``t ~ U(t_min, 1)`` (the usual choice, METHODS.md §4.1)."""

    def __init__(self, t_min: float = 1e-3):
        if not 0 <= t_min < 1:
            raise ValueError(f"t_min must lie in [0, 1), got {t_min}")
        self.t_min = t_min

    def __call__(self, n: int, schedule: GaussianPath) -> Tensor:
        return self.t_min + (1 - self.t_min) * torch.rand(n, device="cpu")

    def density(self, t: Tensor, schedule: GaussianPath) -> Tensor:
        """``p(t)``, so that ``f(t) / p(t)`` estimates ``int_{t_min}^1 f`` without bias."""
        return torch.full_like(t, 1.0 / (1 - self.t_min))


class BetaTime(UniformTime):
    """``t`` on ``[t_min, 1]`` with density ``∝ beta(t) = b0 + t (b1 - b0)`` (inverse CDF of a quadratic)."""

    def __call__(self, n: int, schedule: VPSchedule) -> Tensor:
        self._check(schedule)
        b0, db = schedule.beta_min, schedule.beta_max - schedule.beta_min

        def cdf(t):  # int_0^t beta
            return b0 * t + 0.5 * db * t ** 2

        lo, hi = cdf(self.t_min), cdf(1.0)
        c = lo + (hi - lo) * torch.rand(n, dtype=torch.float64, device="cpu")
        t = (-b0 + torch.sqrt(b0 ** 2 + 2 * db * c)) / db  # solve b0 t + db t^2 / 2 = c
        return t.float()

    @staticmethod
    def _check(schedule) -> None:
        if not isinstance(schedule, VPSchedule):
            raise ValueError(f"time sampler BetaTime needs the continuous VP-SDE (base_model.schedule), got "
                             f"{schedule!r}; use iif.time_sampling.UniformTime")

    def density(self, t: Tensor, schedule: VPSchedule) -> Tensor:
        b0, db = schedule.beta_min, schedule.beta_max - schedule.beta_min
        mass = b0 * (1 - self.t_min) + 0.5 * db * (1 - self.t_min ** 2)
        return schedule.beta(t) / mass
