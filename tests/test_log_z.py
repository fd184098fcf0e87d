"""``iif.metrics.log_z``: the Jarzynski / Crooks / BAR estimates of ``log Z`` and their diagnostics, against
independent references: exact discrete-time path identities on a Brownian base with a Gaussian tilted target
(METHODS check E6), Gaussian work distributions that satisfy Crooks' relation exactly, a brute-force root of BAR's
defining equation, and a direct ESS."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from iif.metrics.log_z import LogZReport, bar, crooks, ess, ess_frac, jarzynski, log_z_report

# ---------------------------------------------------------------------------------------------------------------
# E6: a Brownian base X_{k+1} = X_k + sigma sqrt(dt) xi_k, X_0 = 0, on K Euler steps of [0, 1] (X_K ~ N(0, nu I),
# nu = sigma^2), tilted by r(x) = -E(x) - log N(x; 0, nu I) with E(x) = (x - m)^T P (x - m) / 2: p_tilt = N(m, P^-1)
# and log Z = (d/2) log 2 pi - (1/2) log det P, whatever nu.
D, SIGMA, K = 2, 1.2, 50
DT = 1.0 / K
NU = SIGMA ** 2
# P's eigenvalues (1.14, 0.56) lie in (1 / (2 nu), 2 / nu) = (0.35, 1.39): exactly where both exp(W_F) under the base
# (needs 2 P - I / nu > 0) and exp(-W_R) under the target (needs 2 I / nu - P > 0) have finite variance at u = 0.
P = torch.tensor([[1.0, 0.25], [0.25, 0.7]], dtype=torch.float64)
M = torch.tensor([0.8, -0.5], dtype=torch.float64)
SIGMA_T = torch.linalg.inv(P)  # the target covariance Sigma = P^-1
LOG_Z = 0.5 * D * math.log(2 * math.pi) - 0.5 * math.log(1.0 * 0.7 - 0.25 * 0.25)  # det P by hand
N_PATHS = 100_000


pytestmark = pytest.mark.usefixtures("one_thread")


def reward(x):
    """``r(x) = -(x - m)^T P (x - m) / 2 + |x|^2 / (2 nu) + (d/2) log(2 pi nu)`` ``[n]`` for ``x`` ``[n, d]``."""
    y = x - M
    return -0.5 * ((y @ P) * y).sum(-1) + 0.5 * (x * x).sum(-1) / NU + 0.5 * D * math.log(2 * math.pi * NU)


def forward_works(u, n, gen):
    """Paths of ``P^u``: ``X_{k+1} = X_k + dt sigma u_k + sigma sqrt(dt) xi_k`` from ``X_0 = 0``, and their works
    ``W = r(X_K) - sum_k [sqrt(dt) u_k . xi_k + dt |u_k|^2 / 2]`` (``u = None``: no control)."""
    x = torch.zeros(n, D, dtype=torch.float64)
    pen = torch.zeros(n, dtype=torch.float64)
    for k in range(K):
        xi = torch.randn(n, D, generator=gen, dtype=torch.float64)
        if u is None:
            x = x + SIGMA * math.sqrt(DT) * xi
        else:
            uk = u(x, k * DT)
            pen = pen + math.sqrt(DT) * (uk * xi).sum(-1) + 0.5 * DT * (uk * uk).sum(-1)
            x = x + DT * SIGMA * uk + SIGMA * math.sqrt(DT) * xi
    return reward(x) - pen


def reverse_works(u, n, gen):
    """Paths of ``P*``: ``X_K ~ N(m, P^-1)`` exactly, then the base's Brownian bridge backwards,
    ``X_k | X_{k+1} ~ N((t_k / t_{k+1}) X_{k+1}, sigma^2 t_k (t_{k+1} - t_k) / t_{k+1} I)``; their works
    ``W = r(X_K) + sum_k [log N(X_{k+1}; X_k, sigma^2 dt) - log N(X_{k+1}; X_k + dt sigma u_k, sigma^2 dt)]``."""
    chol = torch.linalg.cholesky(SIGMA_T)
    x_next = M + torch.randn(n, D, generator=gen, dtype=torch.float64) @ chol.T
    w = reward(x_next)
    for k in range(K - 1, -1, -1):
        t, t_next = k * DT, (k + 1) * DT
        std = SIGMA * math.sqrt(t * (t_next - t) / t_next)
        x = (t / t_next) * x_next + std * torch.randn(n, D, generator=gen, dtype=torch.float64)
        if u is not None:
            dx = x_next - x
            res = dx - DT * SIGMA * u(x, t)
            w = w + ((res * res).sum(-1) - (dx * dx).sum(-1)) / (2 * SIGMA ** 2 * DT)
        x_next = x
    return w


def u_star(x, t):
    """The optimal control of the continuous-time problem, ``u* = sigma (grad log p*_t(x) + x / nu_t)`` with
    ``p*_t = N(t m, t^2 Sigma + nu_t (1 - t) I)``, ``nu_t = sigma^2 t`` (``nu_t / nu_1 = t``). Writing
    ``p*_t``'s covariance as ``nu_t M_t``, ``M_t = I + t (Sigma / nu - I)``, the ``1 / nu_t`` terms cancel:

        ``u*(x, t) = (sigma / nu) M_t^-1 [(Sigma / nu - I) x + m]``,

    finite at ``t = 0`` (``u*(x, 0) = (sigma / nu) [(Sigma / nu - I) x + m]``)."""
    eye = torch.eye(D, dtype=torch.float64)
    b = SIGMA_T / NU - eye
    mt = eye + t * b
    return (SIGMA / NU) * torch.linalg.solve(mt, (x @ b.T + M).T).T


def test_u_star_closed_form_is_the_score_of_the_tilted_marginal():
    """The closed form of ``u*`` equals ``sigma (grad log p*_t + x / nu_t)`` by autograd at ``t > 0`` (the bridge
    marginal ``p*_t = N(t m, t^2 Sigma + sigma^2 t (1 - t) I)``), and its ``t -> 0`` limit is finite."""
    x = torch.randn(7, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for t in (1e-3, 0.2, 0.7, 1.0):
        cov = t * t * SIGMA_T + NU * t * (1 - t) * torch.eye(D, dtype=torch.float64)
        xg = x.clone().requires_grad_(True)
        lp = torch.distributions.MultivariateNormal(t * M, covariance_matrix=cov).log_prob(xg).sum()
        (score,) = torch.autograd.grad(lp, xg)
        ref = SIGMA * (score + xg.detach() / (NU * t))
        torch.testing.assert_close(u_star(x, t), ref, rtol=1e-7, atol=1e-7)
    eye = torch.eye(D, dtype=torch.float64)
    torch.testing.assert_close(u_star(x, 0.0), (SIGMA / NU) * (x @ (SIGMA_T / NU - eye).T + M))
    torch.testing.assert_close(u_star(x, 1e-9), u_star(x, 0.0), rtol=1e-7, atol=1e-7)


def _e6_check(u, seed):
    gen = torch.Generator().manual_seed(seed)
    wf, wr = forward_works(u, N_PATHS, gen), reverse_works(u, N_PATHS, gen)
    rep = log_z_report(wf, wr, log_z_exact=LOG_Z)
    assert abs(rep.log_z_jarzynski - LOG_Z) < 0.03, rep
    assert abs(rep.log_z_crooks - LOG_Z) < 0.03, rep
    assert abs(rep.log_z_bar - LOG_Z) < 0.02, rep
    assert rep.work_forward_mean <= LOG_Z <= rep.work_reverse_mean, rep
    assert rep.sandwich_ok
    return wf, wr, rep


def test_e6_uncontrolled_brownian_base():
    """``u = 0``: ``W = r(X_K)`` on both sides (the path part of ``dP*/dP^u`` cancels: ``P*(. | X_K) = P(. | X_K)``);
    the three estimates recover the exact ``log Z``, within the sandwich ``mean W_F <= log Z <= mean W_R``."""
    wf, wr, rep = _e6_check(None, seed=0)
    # the reverse works are the reward at exact tilted samples: their mean is E_tilt[r] in closed form
    nu_inv = 1.0 / NU
    e_tilt_r = (-0.5 * D + 0.5 * nu_inv * (torch.trace(SIGMA_T) + M @ M).item()
                + 0.5 * D * math.log(2 * math.pi * NU))
    assert abs(rep.work_reverse_mean - e_tilt_r) < 0.02
    # E_base[r] in closed form: X_K ~ N(0, nu I)
    e_base_r = -0.5 * (NU * torch.trace(P) + M @ P @ M).item() + 0.5 * D + 0.5 * D * math.log(2 * math.pi * NU)
    assert abs(rep.work_forward_mean - e_base_r) < 0.02


def test_e6_linear_control():
    """A non-zero linear control ``u(x, t) = A x + c``: the Girsanov-corrected forward works and the density-ratio
    reverse works (base bridge, tilted endpoint) still give ``log Z``."""
    a = torch.tensor([[-0.3, 0.1], [0.0, -0.2]], dtype=torch.float64)
    c = torch.tensor([0.5, -0.3], dtype=torch.float64)
    _e6_check(lambda x, t: x @ a.T + c, seed=1)


def test_e6_optimal_control_nearly_constant_works():
    """Under ``u*`` the continuous-time works are constant (``= log Z``: ``P^{u*} = P*``). With ``K = 50`` Euler steps
    they are not: the Euler chain's transition ``N(x + dt sigma u*(x, t_k), sigma^2 dt)`` is only an O(dt)-accurate
    approximation of the exact tilted transition (whose drift varies over the step), so ``Var(W) = O(dt)``, not 0.
    Hence: ``Var(W)`` at least 50x below the uncontrolled one and ``kl_gap < 0.01``."""
    gen = torch.Generator().manual_seed(2)
    n = 20_000
    var0 = forward_works(None, n, gen).var().item()
    wf, wr = forward_works(u_star, n, gen), reverse_works(u_star, n, gen)
    assert var0 / wf.var().item() > 50
    assert var0 / wr.var().item() > 50
    rep = log_z_report(wf, wr, log_z_exact=LOG_Z)
    assert abs(rep.kl_gap) < 0.01  # ~1e-3 here; the sign is within noise at n = 2e4
    assert abs(rep.log_z_bar - LOG_Z) < 0.01
    assert rep.work_ess_frac > 0.95


# ---------------------------------------------------------------------------------------------------------------
# Gaussian work distributions satisfying Crooks' relation: W_F ~ N(mu, s^2), W_R ~ N(mu + s^2, s^2), log Z = mu + s^2/2
# (E[exp(W_F)] = exp(mu + s^2/2), E[exp(-W_R)] = exp(-mu - s^2/2)); KL(P^u || P*) = KL(P* || P^u) = s^2 / 2.

def gaussian_works(mu, s, n, m, seed):
    gen = torch.Generator().manual_seed(seed)
    wf = mu + s * torch.randn(n, generator=gen, dtype=torch.float64)
    wr = mu + s * s + s * torch.randn(m, generator=gen, dtype=torch.float64)
    return wf, wr


def test_gaussian_works_estimators_and_sandwich():
    mu, s = 0.3, 1.0
    wf, wr = gaussian_works(mu, s, 200_000, 150_000, seed=0)
    log_z = mu + s * s / 2
    assert abs(jarzynski(wf) - log_z) < 0.015
    assert abs(crooks(wr) - log_z) < 0.015
    assert abs(bar(wf, wr) - log_z) < 0.01
    rep = log_z_report(wf, wr, log_z_exact=log_z)
    assert rep.sandwich_ok and rep.work_forward_mean < log_z < rep.work_reverse_mean
    assert abs(rep.kl_gap - s * s / 2) < 0.02 and abs(rep.kl_gap_reverse - s * s / 2) < 0.02
    assert abs(rep.work_ess_frac - math.exp(-s * s)) < 0.02  # ESS/n -> E[w]^2 / E[w^2] = exp(-s^2) for lognormal w


@pytest.mark.parametrize("s,n,m,seed", [(0.05, 500, 700, 0), (0.5, 2000, 300, 1), (2.0, 1000, 1000, 2),
                                        (5.0, 3000, 50, 3), (10.0, 4000, 4000, 4)])
def test_bar_is_the_root_of_the_defining_equation_brentq(s, n, m, seed):
    """BAR against scipy's brentq on ``g(f) = mean sigmoid(W - f) - mean sigmoid(f - W')`` (numpy, no torch)."""
    from scipy.optimize import brentq
    from scipy.special import expit

    wf, wr = gaussian_works(-1.0, s, n, m, seed)
    a, b = wf.numpy(), wr.numpy()
    lo, hi = min(a.min(), b.min()) - 50, max(a.max(), b.max()) + 50
    ref = brentq(lambda f: expit(a - f).mean() - expit(f - b).mean(), lo, hi, xtol=1e-13, rtol=1e-15, maxiter=500)
    assert bar(wf, wr) == pytest.approx(ref, abs=1e-8)


@pytest.mark.parametrize("s", [20.0, 60.0])
def test_bar_without_overlap_against_log_space_bisection(s):
    """Barely overlapping works (KL = s^2 / 2 in the hundreds): the linear-space ``g`` underflows, so the reference is
    a bisection on ``log mean sigmoid(W - f) - log mean sigmoid(f - W')`` written here in numpy. (This is also the
    regime where the self-consistent iteration ``f <- f + h(f)`` has slope ~ -1 and stalls.)"""
    wf, wr = gaussian_works(0.0, s, 2000, 1000, seed=5)
    a, b = wf.numpy(), wr.numpy()

    def h(f):
        la = -np.logaddexp(0.0, f - a)
        lb = -np.logaddexp(0.0, b - f)
        return (np.logaddexp.reduce(la) - math.log(a.size)) - (np.logaddexp.reduce(lb) - math.log(b.size))

    lo, hi = min(a.min(), b.min()) - 10, max(a.max(), b.max()) + 10
    assert h(lo) > 0 > h(hi)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if h(mid) > 0 else (lo, mid)
    assert bar(wf, wr) == pytest.approx(0.5 * (lo + hi), abs=1e-8)


def test_bar_degenerate_and_nonconvergence():
    """Constant works ``c`` on both sides (a perfect sampler): every estimate is ``c``; a cap of one step raises."""
    c = torch.full((10,), 1.7, dtype=torch.float64)
    assert jarzynski(c) == pytest.approx(1.7, abs=1e-12) and crooks(c) == pytest.approx(1.7, abs=1e-12)
    assert bar(c, c[:4]) == pytest.approx(1.7, abs=1e-12)
    rep = log_z_report(c, c)
    assert rep.kl_gap == pytest.approx(0, abs=1e-12) and rep.work_ess_frac == pytest.approx(1.0) and rep.sandwich_ok
    wf, wr = gaussian_works(0.0, 3.0, 1000, 1000, seed=6)
    with pytest.raises(RuntimeError, match="max_iter=1"):
        bar(wf, wr, max_iter=1)


# ---------------------------------------------------------------------------------------------------------------
# ESS, the report, and input validation

def test_ess_against_direct_sum():
    w = torch.randn(1000, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 1.5
    e = np.exp(w.numpy())
    direct = e.sum() ** 2 / (e * e).sum()
    assert ess(w) == pytest.approx(direct, rel=1e-12)
    assert ess(w + 1000.0) == pytest.approx(direct, rel=1e-10)  # exp(1000) overflows: only the log-space form works
    assert ess_frac(w) == pytest.approx(direct / 1000, rel=1e-12)
    assert ess(torch.tensor([0.0, -1e4, -1e4])) == pytest.approx(1.0)
    assert ess(torch.zeros(5)) == pytest.approx(5.0)


def test_report_without_reverse_and_metrics():
    wf, _ = gaussian_works(0.0, 0.5, 5000, 2, seed=8)
    rep = log_z_report(wf)
    assert isinstance(rep, LogZReport)
    assert rep.log_z_crooks is None and rep.log_z_bar is None and rep.sandwich_ok is None
    assert rep.kl_gap == pytest.approx(rep.log_z_jarzynski - wf.mean().item())
    met = rep.as_metrics("val/")
    assert set(met) == {"val/log_z_jarzynski", "val/work_forward_mean", "val/kl_gap", "val/work_ess_frac"}
    assert all(isinstance(v, float) for v in met.values())


def test_report_with_reverse_and_exact():
    wf, wr = gaussian_works(0.2, 1.0, 4000, 3000, seed=9)
    rep = log_z_report(wf, wr, log_z_exact=0.7)
    met = rep.as_metrics()
    assert {"log_z_jarzynski", "log_z_crooks", "log_z_bar", "log_z_error_jarzynski", "log_z_error_crooks",
            "log_z_error_bar", "kl_gap", "kl_gap_reverse", "work_ess_frac", "work_forward_mean", "work_reverse_mean",
            "sandwich_ok", "log_z_exact"} == set(met)
    assert met["sandwich_ok"] == 1.0
    assert met["log_z_error_bar"] == pytest.approx(met["log_z_bar"] - 0.7)
    assert met["kl_gap"] == pytest.approx(met["log_z_bar"] - wf.mean().item())
    assert met["work_reverse_mean"] == pytest.approx(wr.mean().item())
    # a violated sandwich: the reverse works of another problem, below the forward ones
    assert log_z_report(wf, wr - 5.0).as_metrics()["sandwich_ok"] == 0.0


def test_input_validation():
    ok = torch.zeros(4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"w_forward must have shape \[n\] with n >= 2, got \(2, 2\)"):
        jarzynski(torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"w_reverse .* got \(1,\)"):
        crooks(torch.zeros(1))
    bad = ok.clone()
    bad[1], bad[3] = math.nan, math.inf
    with pytest.raises(ValueError, match="w_reverse has 2 non-finite values .* out of 4, first at index 1"):
        bar(ok, bad)
    with pytest.raises(ValueError, match="w_forward has 2 non-finite"):
        log_z_report(bad, ok)
    with pytest.raises(ValueError, match="log_w has 2 non-finite"):
        ess(bad)
    with pytest.raises(ValueError, match="tol must be > 0"):
        bar(ok, ok, tol=0.0)
    with pytest.raises(ValueError, match="max_iter must be >= 1"):
        bar(ok, ok, max_iter=0)
    with pytest.raises(ValueError, match="log_z_exact must be finite"):
        log_z_report(ok, log_z_exact=math.nan)
