"""`iif-reproduce variance` (iif/studies/variance.py): its closed forms against independent computations (the
unified paper's table in its own time convention, Monte Carlo at fixed t, scipy quadrature, autograd), and the
study run end to end at its `test` scale."""
from __future__ import annotations

import json
import math

import pytest
import torch
from omegaconf import OmegaConf
from scipy.integrate import quad

from iif.specs import load_spec
from iif.reproduce import main as reproduce
from iif.studies import variance as V

D, S, A, B = 1, 2.0, 0.5, 1.0
S2P = 1 / (1 / S ** 2 + A)  # s'^2 = 4/3


SPEC = OmegaConf.create({"d": D, "s": S, "m": 0.0, "a": A, "b": B, "adjoint_sampling": {"sigma": 2.0}})


pytestmark = pytest.mark.usefixtures("one_thread")


def _paper_table(tp: float) -> dict[str, float]:
    """The unified paper's per-time variance densities f(t_p) = g^2 E Var(Y | x_t), its time t_p = 1 - t."""
    v, vp = tp ** 2 * S ** 2 + (1 - tp) ** 2, tp ** 2 * S2P + (1 - tp) ** 2
    return {"CSM": 2 * D * tp * S2P / ((1 - tp) * vp),
            "TSM": 2 * D * (1 - tp) ** 3 / (tp ** 3 * S2P * vp),
            "NSM": 2 * D * tp * (1 - tp) ** 3 * (1 - 1 / S2P) ** 2 * S2P / (vp * (tp ** 2 + (1 - tp) ** 2) ** 2),
            "AM": 2 * D * A ** 2 * S ** 4 * S2P * tp * (1 - tp) ** 3 / (v ** 2 * vp)}


def _adjoint_sampling_table(tp: float, sigma_b: float = 2.0) -> dict[str, float]:
    """Adjoint sampling (Brownian base from 0): control-unit noise from the bridge X_t | X_1 ~ N(t_p X_1, w),
    w = nu_1 t_p (1 - t_p), with X_1 ~ N(m', s'^2): Var(X_1 | X_t) = s'^2 w / (w + t_p^2 s'^2)."""
    nu1 = sigma_b ** 2
    nut, w = nu1 * tp, nu1 * tp * (1 - tp)
    var = S2P * w / (w + tp ** 2 * S2P)
    return {"AS": sigma_b ** 2 * A ** 2 * D * var,                       # sigma_b grad r(X_1)
            "CSM": sigma_b ** 2 * D * var / (nu1 - nut) ** 2,             # sigma_b (X_1 - X_t) / (nu_1 - nu_t)
            "TSM": sigma_b ** 2 * D * (nu1 / nut) ** 2 * var / S2P ** 2}  # sigma_b nu_1/nu_t grad log p_tilt(X_1)


@pytest.mark.parametrize("make,table", [(V.rectified_flow, _paper_table),
                                        (V.adjoint_sampling, _adjoint_sampling_table)])
def test_the_closed_form_density_is_the_papers_table(make, table):
    setting = make(SPEC)
    assert setting.tilt_var == pytest.approx(4 / 3) and setting.tilt_mean == pytest.approx(4 / 3)
    for tp in (1e-4, 0.1, 0.5, 0.9, 1 - 1e-4):
        t = torch.tensor([1 - tp], dtype=torch.float64)
        for label, want in table(tp).items():
            got = float(setting.density(setting.estimators[label][0], t)[0])
            assert got == pytest.approx(want, rel=1e-9), (label, tp)


def _fixed_t(setting, t: float, n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    tt = torch.full((n,), t, dtype=torch.float64)
    x0 = setting.tilt_mean + math.sqrt(setting.tilt_var) * torch.randn(n, setting.d, generator=gen,
                                                                        dtype=torch.float64)
    alpha, sigma, _ = setting.coefficients(tt)
    return tt, x0, alpha * x0 + sigma * torch.randn(n, setting.d, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("make", [V.rectified_flow, V.adjoint_sampling])
def test_monte_carlo_noise_at_fixed_t_matches_the_density_and_every_target_is_unbiased(make):
    """E[f | t] by Monte Carlo within 4 s.e. of the closed form; E[Y | x_t] = s*_t: the regression of Y on (1, x_t)
    at a fixed t recovers s*_t's intercept alpha m'/V' and slope -1/V' within 4 standard errors."""
    setting = make(SPEC)
    n = 100_000
    for t in (0.05, 0.5, 0.95):
        tt, x0, xt = _fixed_t(setting, t, n, seed=int(100 * t))
        alpha, sigma, _ = setting.coefficients(tt[:1])
        vp = float(alpha ** 2 * setting.tilt_var + sigma ** 2)
        want = torch.tensor([float(alpha) * setting.tilt_mean / vp, -1 / vp], dtype=torch.float64)
        X = torch.cat([torch.ones(n, 1, dtype=torch.float64), xt], 1)
        for label, (target, _) in setting.estimators.items():
            f = setting.noise(target, tt, x0, xt)
            exact = float(setting.density(target, tt[:1])[0])
            assert abs(float(f.mean()) - exact) <= 4 * float(f.std()) / math.sqrt(n), (label, t)
            y = setting.target(target, tt, x0, xt)
            coef = torch.linalg.lstsq(X, y).solution[:, 0]
            resid = y[:, 0] - X @ coef
            se = torch.sqrt(torch.diag(torch.linalg.inv(X.T @ X)) * resid.var())
            assert torch.all((coef - want).abs() <= 4 * se), (label, t, coef, want, se)


def test_exact_integrals_of_the_finite_estimators():
    """The full integrals by the study's quadrature, by scipy on the paper's table, and the figures of the brief:
    NSM 0.037682, AM 0.901388 (rectified flow); adjoint sampling's AS integral equals AM's (both bases are
    memoryless with data N(0, 4), and the path-KL-weighted integral does not depend on the time parametrisation)."""
    rf, adj = V.rectified_flow(SPEC), V.adjoint_sampling(SPEC)
    for label, want in (("NSM", 0.037682), ("AM", 0.901388)):
        ours = V.quadrature(lambda t: rf.density(rf.estimators[label][0], t), 0.0)
        scipy_value = quad(lambda tp: _paper_table(tp)[label], 0, 1, epsabs=1e-13, epsrel=1e-12)[0]
        assert ours == pytest.approx(scipy_value, rel=1e-9)
        assert ours == pytest.approx(want, abs=1e-6)
    as_scipy = quad(lambda tp: _adjoint_sampling_table(tp)["AS"], 0, 1, epsabs=1e-13, epsrel=1e-12)[0]
    assert V.quadrature(lambda t: adj.density(adj.estimators["AS"][0], t), 0.0) == pytest.approx(as_scipy, rel=1e-9)
    assert as_scipy == pytest.approx(0.901388, abs=1e-6)
    # AS's bound: int <= nu_1 E|grad r|^2 (the brief's): nu_1 E[(b - a X)^2] under p_tilt
    assert as_scipy <= 4 * ((B - A * 4 / 3) ** 2 + A ** 2 * S2P)


def test_truncated_integrals_of_the_divergent_estimators():
    """Quadrature over [eps, 1 - eps] against scipy on the paper's table; CSM grows by 2d log 10 a decade of eps,
    TSM like eps^-2 (C/2 eps^-2, C = 2d/s'^2)."""
    rf = V.rectified_flow(SPEC)
    for eps in (1e-2, 1e-3, 1e-4):
        for label in ("CSM", "TSM"):
            ours = V.quadrature(lambda t: rf.density(rf.estimators[label][0], t), eps)
            pieces = [eps, 1e-3, 1e-2, 0.1, 0.5, 0.9, 0.99, 0.999, 1 - eps]
            pieces = sorted(p for p in set(pieces) if eps <= p <= 1 - eps)
            ref = sum(quad(lambda tp: _paper_table(tp)[label], lo, hi, epsrel=1e-12, limit=200)[0]
                      for lo, hi in zip(pieces[:-1], pieces[1:]))
            assert ours == pytest.approx(ref, rel=1e-8), (label, eps)
    csm = [V.quadrature(lambda t: rf.density(rf.estimators["CSM"][0], t), e) for e in (1e-3, 1e-4)]
    assert csm[1] - csm[0] == pytest.approx(2 * D * math.log(10), rel=1e-3)
    tsm = V.quadrature(lambda t: rf.density(rf.estimators["TSM"][0], t), 1e-4)
    assert tsm == pytest.approx(D / S2P * 1e8, rel=1e-3)
    assert rf.lead(rf.estimators["TSM"][0], rf.estimators["TSM"][1]) == pytest.approx(2 * D / S2P, rel=1e-6)


def test_adjoint_sampling_targets_in_control_units():
    """g (Y - s_base(x_t)) with g = sigma_b is AS's sigma_b grad r(X_1), the bridge drift sigma_b (X_1 - X_t) /
    (nu_1 - nu_t) for CSM and sigma_b (nu_1/nu_t grad log p_tilt(X_1) + X_t / nu_t) for TSM (paper time)."""
    adj = V.adjoint_sampling(SPEC)
    sb, nu1 = 2.0, 4.0
    tt, x1, xt = _fixed_t(adj, 0.3, 1000)
    tp = 0.7
    nut = nu1 * tp
    alpha, sigma, g2 = adj.coefficients(tt)
    s_base = -xt / nut  # p_base at t_p: N(0, nu_t)
    control = {k: g2.sqrt() * (adj.target(target, tt, x1, xt) - s_base) for k, (target, _) in adj.estimators.items()}
    torch.testing.assert_close(control["AS"], sb * (B - A * x1))
    torch.testing.assert_close(control["CSM"], sb * (x1 - xt) / (nu1 - nut))
    torch.testing.assert_close(control["TSM"], sb * (nu1 / nut * adj.target_score(x1) + xt / nut))


def test_gradient_of_the_linear_control_at_its_optimum():
    """Autograd's per-sample gradient of |u_theta(x_t) - g (Y - s_base)|^2 at the optimal theta, u_theta = theta_0
    + theta_1 x_t: |G|^2 = 4 f (1 + |x_t|^2) (GaussianTilt.gradient_sq), and its mean is ~0 (an unbiased target)."""
    rf = V.rectified_flow(SPEC)
    n = 20_000
    tt, x0, xt = _fixed_t(rf, 0.4, n)
    alpha, sigma, g2 = rf.coefficients(tt[:1])
    v, vp = float(alpha ** 2 * S ** 2 + sigma ** 2), float(alpha ** 2 * rf.tilt_var + sigma ** 2)
    g = float(g2.sqrt())
    # u* = g (s* - s_base) = g ((x - alpha m)/V - (x - alpha m')/V'), m = 0
    theta = torch.tensor([g * float(alpha) * rf.tilt_mean / vp, g * (1 / v - 1 / vp)], dtype=torch.float64,
                         requires_grad=True)
    s_base = -xt / v
    for label, (target, _) in rf.estimators.items():
        yhat = g * (rf.target(target, tt, x0, xt) - s_base)[:, 0]
        grads = torch.stack([torch.autograd.grad((theta[0] + theta[1] * xt[i, 0] - yhat[i]) ** 2, theta)[0]
                             for i in range(5)])
        f = rf.noise(target, tt, x0, xt)
        torch.testing.assert_close((grads ** 2).sum(1), rf.gradient_sq(f, xt)[:5])
        resid = (theta[0] + theta[1] * xt[:, 0] - yhat).detach()
        mean_grad = torch.stack([2 * resid, 2 * resid * xt[:, 0]], 1)
        assert torch.all(mean_grad.mean(0).abs() <= 4 * mean_grad.std(0) / math.sqrt(n)), label


def test_laws_report_a_wrong_slope_as_fail():
    tol = {"slope_tol": 0.15, "finite_slope_min": -0.2, "integral_rtol": 0.05, "z": 4}
    means = {str(n): {"typical": 2 * math.log(n), "mean": 1.0, "pooled_se": 0.1} for n in (1000, 10000, 100000)}
    r = {"slopes": {"data": {"fit": -0.5}, "noise": {"fit": 1.0}},
         "integrals": {"0.01": 1.0, "0.001": 1 + 2 * math.log(10)}, "lead": 2.0, "means": means, "exact": 1.0}
    ok, line = V.Diverges(V.DATA, 1.0).check("CSM", r, tol)
    assert not ok and "slope -0.50 (law -1)" in line
    r["slopes"]["data"]["fit"] = -1.0
    assert V.Diverges(V.DATA, 1.0).check("CSM", r, tol)[0]
    assert V.Finite().check("NSM", r, tol)[0] is False  # slope -1 at the data end: not bounded
    with pytest.raises(ValueError, match="k >= 1"):
        V.Diverges(V.DATA, 0.5)


def test_iif_reproduce_variance_runs_the_study(tmp_path):
    assert reproduce(["variance", "--scale", "test", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "table.md").read_text()
    assert report.count("PASS  ") == 8 and "FAIL" not in report
    for line in ("PASS  rectified_flow/CSM diverges at the data end", "PASS  rectified_flow/TSM diverges at the "
                 "noise end", "PASS  rectified_flow/NSM finite", "PASS  rectified_flow/AM finite",
                 "PASS  adjoint_sampling/AS finite", "PASS  adjoint_sampling/CSM diverges at the data end",
                 "PASS  adjoint_sampling/TSM diverges at the noise end"):
        assert line in report
    numbers = json.loads((tmp_path / "variance.json").read_text())
    assert numbers["passed"] and numbers["params"]["ns"] == [1000, 10000, 100000]
    rf = numbers["settings"]["rectified_flow"]["estimators"]
    assert rf["NSM"]["exact"] == pytest.approx(0.0376821, abs=1e-7) and rf["CSM"]["exact"] == "inf"
    for name in ("variance_vs_t.png", "variance_vs_n.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_a_failed_check_makes_iif_reproduce_exit_1(tmp_path, monkeypatch):
    spec = load_spec("variance")
    spec.tolerances.slope_tol = 0.0  # no fitted slope is exactly the law's
    monkeypatch.setattr("iif.reproduce.load_spec", lambda name: spec)
    assert reproduce(["variance", "--scale", "test", "--seeds", "0,1", "--out", str(tmp_path)]) == 1
    report = (tmp_path / "table.md").read_text()
    assert "FAIL  rectified_flow/CSM diverges" in report and "PASS  rectified_flow/NSM finite" in report
