"""Tests of the adaptive constant c and the relaxed rejection step (docs/methods.md §3.2–3.3).

References: the expected acceptance G(l) = mean_i min(1, exp(l_i - l)) evaluated here with numpy (long double
sums), an explicit loop, a bisection written in this file, and empirical frequencies of many seeded draws.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from iif.importance import (expected_acceptance, relaxed_rejection, solve_log_c, solve_log_c_bisection,
                            solve_log_c_per_group)

DT = torch.float64
RHOS = [0.05, 0.3, 0.7, 0.99]


def _G(log_w, log_c) -> float:
    """Expected acceptance mean_i exp(min(0, l_i - log c)), computed independently in numpy."""
    lw = np.asarray(log_w, dtype=np.float64)
    return float(np.mean(np.exp(np.minimum(0.0, lw - float(log_c)))))


def _own_bisection(log_w, rho, iters=200) -> float:
    """Plain bisection of the non-increasing G on [min l - 1, max l - log(rho) + 1] (G(lo) = 1 >= rho >= G(hi))."""
    lw = np.asarray(log_w, dtype=np.float64)
    lo, hi = lw.min() - 1.0, lw.max() - math.log(rho) + 1.0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if _G(lw, mid) > rho:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _log_weights(kind: str, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(n, dtype=DT, generator=g)
    if kind == "wide":  # spread of many nats: a few samples dominate
        return 15.0 * torch.randn(n, dtype=DT, generator=g) - 300.0
    if kind == "heavy":  # Cauchy-tailed log-weights: some w_i far above c
        u = torch.rand(n, dtype=DT, generator=g)
        return torch.tan(math.pi * (u - 0.5))
    if kind == "ties":  # heavily repeated values
        return torch.randint(0, 3, (n,), generator=g).to(DT) * 1.7 - 2.0
    if kind == "equal":
        return torch.full((n,), 3.25, dtype=DT)
    raise ValueError(kind)


KINDS = ["normal", "wide", "heavy", "ties", "equal"]


def test_expected_acceptance_matches_loop():
    """expected_acceptance(log_w, log_c) == (1/N) sum_i min(1, w_i / c), by an explicit Python loop."""
    lw = _log_weights("normal", 37, 0)
    for log_c in [-2.0, 0.0, 0.4, 3.0]:
        ref = sum(min(1.0, math.exp(float(l) - log_c)) for l in lw) / len(lw)
        assert float(expected_acceptance(lw, log_c)) == pytest.approx(ref, rel=1e-14)
    assert float(expected_acceptance(lw, torch.tensor(0.4, dtype=DT))) == pytest.approx(_G(lw, 0.4), rel=1e-14)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 2, 10, 257, 5000])
@pytest.mark.parametrize("rho", RHOS)
def test_solve_log_c_hits_rate(kind, n, rho):
    """G(solve_log_c(l, rho)) == rho to 1e-9 (G evaluated independently), and the result agrees with both the
    package's bisection reference and a bisection written here to 1e-6 (the root is unique for rho < 1 because
    G is strictly decreasing wherever G < 1)."""
    lw = _log_weights(kind, n, seed=1000 * n + int(100 * rho))
    log_c = solve_log_c(lw, rho)
    assert isinstance(log_c, float)
    assert abs(_G(lw, log_c) - rho) < 1e-9
    assert abs(log_c - solve_log_c_bisection(lw, rho)) < 1e-6
    assert abs(log_c - _own_bisection(lw, rho)) < 1e-6


def test_heavy_tailed_case_has_weights_above_c():
    """Coverage check of the regime 'some w_i > c' (alpha_i = 1): it occurs in the heavy/wide cases, and there the
    identity G = (#{w_i >= c} + sum_{w_i < c} w_i / c) / N holds with the solved c (computed by hand)."""
    for kind in ["heavy", "wide"]:
        lw = _log_weights(kind, 5000, seed=7)
        for rho in [0.05, 0.3]:
            log_c = solve_log_c(lw, rho)
            above = lw >= log_c
            assert above.sum() >= 1
            below = lw[~above]
            g = (int(above.sum()) + float(torch.exp(below - log_c).sum())) / len(lw)
            assert abs(g - rho) < 1e-9


def test_solve_log_c_shift_equivariance():
    """Multiplying every weight by e^s multiplies c by e^s: log c(l + s) == log c(l) + s (G depends on l - log c)."""
    lw = _log_weights("heavy", 300, 3)
    for rho in RHOS:
        assert solve_log_c(lw + 123.4, rho) == pytest.approx(solve_log_c(lw, rho) + 123.4, abs=1e-9)


def test_solve_log_c_equal_weights_closed_form():
    """All weights equal to l0: G(l) = exp(l0 - l) for l >= l0, hence log c = l0 - log(rho) exactly."""
    lw = _log_weights("equal", 64, 0)
    for rho in RHOS:
        assert solve_log_c(lw, rho) == pytest.approx(3.25 - math.log(rho), abs=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_rho_one_gives_full_acceptance(kind):
    """rho = 1: the returned log c has G(log c) == 1 (every sample kept with probability 1)."""
    lw = _log_weights(kind, 100, 4)
    log_c = solve_log_c(lw, 1.0)
    assert _G(lw, log_c) == pytest.approx(1.0, abs=1e-15)
    assert _G(lw, solve_log_c_bisection(lw, 1.0)) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("solver", [solve_log_c, solve_log_c_bisection])
@pytest.mark.parametrize("rho", [0.0, -0.1, 1.0000001, 2.0, float("nan")])
def test_invalid_rate_raises(solver, rho):
    """rho outside (0, 1] (and NaN) raises ValueError in both solvers."""
    with pytest.raises(ValueError):
        solver(_log_weights("normal", 10, 0), rho)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_log_weights_raise(bad):
    """NaN (and infinite) log-weights raise ValueError instead of returning a meaningless c; so does an empty vector."""
    lw = _log_weights("normal", 10, 0)
    lw[3] = bad
    with pytest.raises(ValueError):
        solve_log_c(lw, 0.3)
    with pytest.raises(ValueError):
        solve_log_c(torch.zeros(0, dtype=DT), 0.3)


@pytest.mark.parametrize("rho", [0.05, 0.3, 0.7])
def test_relaxed_rejection_empirical_rate(rho):
    """Over 400 seeded draws on a fixed batch of 500 heavy-tailed log-weights with c solved for rho, the mean
    accepted fraction matches rho (5 standard errors of the Poisson-binomial mean), and each sample's acceptance
    frequency matches alpha_i = min(1, w_i / c) (5 binomial standard errors where the normal approximation holds,
    pooled over the samples with tiny alpha_i; samples with alpha_i = 1 always kept)."""
    lw = _log_weights("heavy", 500, 5)
    log_c = solve_log_c(lw, rho)
    alpha = torch.exp(torch.clamp(lw - log_c, max=0.0))
    torch.manual_seed(6)
    reps = 400
    acc = torch.stack([relaxed_rejection(lw, log_c) for _ in range(reps)]).double()  # [reps, N]
    assert acc.dtype == DT
    var_one = float((alpha * (1 - alpha)).sum()) / len(lw) ** 2  # variance of one draw's accepted fraction
    assert abs(float(acc.mean()) - rho) < 5 * math.sqrt(var_one / reps)
    freq = acc.mean(0)
    var = alpha * (1 - alpha)
    big = reps * var >= 10  # normal approximation per sample is fine there
    assert big.sum() >= 5
    assert ((freq - alpha)[big].abs() <= 5 * torch.sqrt(var[big] / reps)).all()
    small = ~big & (alpha < 1)  # pool the rest: total accepts vs sum of alpha_i
    if small.any():
        diff = float(acc[:, small].sum() - reps * alpha[small].sum())
        assert abs(diff) <= 5 * math.sqrt(reps * float(var[small].sum())) + 1e-9
    assert (acc[:, alpha == 1.0] == 1).all()


def test_relaxed_rejection_extremes():
    """log c far below all log-weights keeps everything; far above keeps (almost) nothing."""
    lw = _log_weights("normal", 1000, 8)
    torch.manual_seed(9)
    assert relaxed_rejection(lw, -1e6).all()
    assert not relaxed_rejection(lw, 1e6).any()


def test_one_constant_per_condition_keeps_rho_of_each_and_samples_each_posterior():
    """docs/methods.md §3.5. Proposal ``x ~ N(0, 1)`` (RND 1), ``r(x | y) = -(x - y)^2 / (2 s^2)``: the tilt is
    ``p(x | y) = N(y / (1 + s^2), s^2 / (1 + s^2))`` and ``Z(y) = sqrt(s^2 / (1 + s^2)) exp(-y^2 / (2 (1 + s^2)))``.
    Three conditions, ``G`` draws each, ``rho`` below every ``Z(y)`` (so ``c(y) > max w``, the exact regime). One
    constant per group: each group's expected acceptance is ``rho`` and its kept ``x`` follow ``p(x | y)``; one
    constant for the batch keeps the groups in the ratio of their ``Z(y)`` (``Z(3) / Z(0) = exp(-3.6)``)."""
    torch.manual_seed(0)
    s2, g, rho = 0.25, 50_000, 0.01
    ys = torch.tensor([0.0, 1.5, 3.0], dtype=torch.float64)
    x = torch.randn(3 * g, dtype=torch.float64)
    log_w = -(x - ys.repeat_interleave(g)) ** 2 / (2 * s2)
    log_c = solve_log_c_per_group(log_w, rho, g)
    assert log_c.shape == (3 * g,) and torch.equal(log_c.view(3, g)[:, 0:1].expand(3, g), log_c.view(3, g))
    alpha = torch.exp(torch.clamp(log_w - log_c, max=0.0)).view(3, g)
    torch.testing.assert_close(alpha.mean(1), torch.full((3,), rho, dtype=torch.float64))
    keep = relaxed_rejection(log_w, log_c).view(3, g)
    mean, var = ys / (1 + s2), s2 / (1 + s2)
    for j in range(3):
        kept = x.view(3, g)[j][keep[j]]
        assert abs(len(kept) - rho * g) < 5 * math.sqrt(rho * g)
        assert abs(kept.mean().item() - mean[j].item()) < 5 * math.sqrt(var / len(kept))
        assert abs(kept.var().item() / var - 1) < 0.25
    # one constant for the batch: the groups' shares follow Z(y); y = 3 keeps about exp(-3.6) of y = 0's share
    kept_global = relaxed_rejection(log_w, solve_log_c(log_w, rho)).view(3, g).sum(1).double()
    assert kept_global[2] / kept_global[0] < 0.1 < (keep[2].sum() / keep[0].sum()).item()
    with pytest.raises(ValueError, match="groups of 7"):
        solve_log_c_per_group(log_w, rho, 7)


def test_one_group_is_the_single_constant():
    """``group_size = N`` is :func:`solve_log_c` (IIF's default path is unchanged)."""
    torch.manual_seed(1)
    log_w = 3 * torch.randn(1000, dtype=torch.float64)
    log_c = solve_log_c_per_group(log_w, 0.3, 1000)
    assert torch.all(log_c == solve_log_c(log_w, 0.3))
