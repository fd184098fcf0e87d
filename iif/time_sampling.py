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
    """``t ~ U(t_min, 1)`` (the usual choice, docs/methods.md §4.1)."""

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
    """``t`` on ``[t_min, 1]`` with density ``∝ g(t)^2``, the path-KL weight (``beta(t)`` on the VP-SDE).

    On the continuous VP-SDE ``g^2 = beta(t) = b0 + t (b1 - b0)`` and the inverse CDF is that of a quadratic (closed
    form). On any other path (a discrete schedule, rectified flow) the CDF is tabulated on ``grid`` cells of
    ``[t_min, 1]`` with ``g^2`` at the cell midpoints, and ``t`` is drawn uniformly within the chosen cell: the
    density is then piecewise constant and :meth:`density` returns exactly it.

    Args:
        t_min: the smallest time.
        grid: cells of the tabulated CDF (paths other than the VP-SDE).
    """

    def __init__(self, t_min: float = 1e-3, grid: int = 4096):
        super().__init__(t_min)
        if grid < 2:
            raise ValueError(f"BetaTime grid must be >= 2, got {grid}")
        self.grid = grid
        self._table: tuple | None = None

    def __call__(self, n: int, schedule: GaussianPath) -> Tensor:
        if not isinstance(schedule, VPSchedule):
            edges, cdf, _ = self._tabulate(schedule)
            u = torch.rand(n, dtype=torch.float64, device="cpu")
            cell = torch.searchsorted(cdf, u, right=True).clamp(max=self.grid - 1)  # cdf[cell-1] <= u < cdf[cell]
            frac = torch.rand(n, dtype=torch.float64, device="cpu")
            return (edges[cell] + frac * (edges[cell + 1] - edges[cell])).float()
        b0, db = schedule.beta_min, schedule.beta_max - schedule.beta_min

        def cdf(t):  # int_0^t beta
            return b0 * t + 0.5 * db * t ** 2

        lo, hi = cdf(self.t_min), cdf(1.0)
        c = lo + (hi - lo) * torch.rand(n, dtype=torch.float64, device="cpu")
        t = (-b0 + torch.sqrt(b0 ** 2 + 2 * db * c)) / db  # solve b0 t + db t^2 / 2 = c
        return t.float()

    def _tabulate(self, schedule: GaussianPath) -> tuple[Tensor, Tensor, Tensor]:
        """(cell edges ``[grid+1]``, CDF at the right edges ``[grid]``, density per cell ``[grid]``), cached per path."""
        if self._table is None or self._table[0] is not schedule:
            edges = torch.linspace(self.t_min, 1.0, self.grid + 1, dtype=torch.float64)
            g2 = schedule.diffusion_sq(0.5 * (edges[1:] + edges[:-1]))
            mass = g2 * (edges[1:] - edges[:-1])
            cdf = torch.cumsum(mass, 0) / mass.sum()
            self._table = (schedule, edges, cdf, g2 / mass.sum())
        return self._table[1:]

    def density(self, t: Tensor, schedule: GaussianPath) -> Tensor:
        if not isinstance(schedule, VPSchedule):
            edges, _, dens = self._tabulate(schedule)
            cell = (torch.searchsorted(edges.to(t.device), t.double(), right=True) - 1).clamp(0, self.grid - 1)
            return dens.to(t.device)[cell].to(t.dtype)
        b0, db = schedule.beta_min, schedule.beta_max - schedule.beta_min
        mass = b0 * (1 - self.t_min) + 0.5 * db * (1 - self.t_min ** 2)
        return schedule.beta(t) / mass
