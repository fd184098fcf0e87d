"""Training-time distributions against their densities (independent check: histograms and quadrature)."""
from __future__ import annotations

import pytest
import torch

from iif.schedules import DiscreteSchedule, RectifiedFlow, VPSchedule
from iif.time_sampling import BetaTime


@pytest.mark.parametrize("path", [DiscreteSchedule(100), RectifiedFlow(), VPSchedule()], ids=["discrete", "rectified_flow", "vp"])
def test_beta_time_draws_follow_the_path_kl_weight(path):
    """``BetaTime`` draws ``t`` with density ``∝ g(t)^2`` on ``[t_min, 1]``: the density integrates to 1, is
    proportional to ``diffusion_sq`` (computed by the path), and the draws' histogram matches it within 5 s.e."""
    ts = BetaTime(t_min=0.01, grid=2048)
    t = torch.linspace(0.01, 1.0, 200_001, dtype=torch.float64)[1:-1]
    dens = ts.density(t, path).double()
    assert abs(torch.trapezoid(dens, t).item() - 1) < 5e-3  # quadrature of a steep tail (rectified flow)
    g2 = path.diffusion_sq(t)
    ratio = dens / g2
    inner = ((t > 0.05) & (t < 0.95))
    close = ((ratio[inner] / ratio[inner].median() - 1).abs() < 0.01).double().mean().item()
    assert close > 0.95  # ∝ g^2 except in table cells that straddle a step of a piecewise-constant g^2
    torch.manual_seed(0)
    n = 200_000
    draws = ts(n, path).double()
    assert draws.min() >= 0.01 and draws.max() <= 1.0
    edges = torch.linspace(0.01, 1.0, 21, dtype=torch.float64)
    counts = torch.histc(draws, bins=20, min=0.01, max=1.0)
    for a, b, c in zip(edges[:-1], edges[1:], counts):
        sel = (t >= a) & (t < b)
        p = torch.trapezoid(dens[sel], t[sel]).item()
        se = (n * p * (1 - p)) ** 0.5
        assert abs(c.item() - n * p) < 5 * se + 0.002 * n, (a.item(), c.item(), n * p)
