"""Tests of ``iif.gmm.GMM`` against independent references.

References used: ``torch.distributions`` mixtures (densities, and scores by autograd through them), explicit
loops, and Riemann/midpoint quadrature on fine 2-D grids (products).  Every test runs both the isotropic fast
path (``_iso_var`` set) and the general Cholesky path (non-isotropic covariances).
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import distributions as td

from iif.gmm import GMM

DT = torch.float64


# ---------------------------------------------------------------------------------------------- fixtures / helpers
def _random_spd(k: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """``k`` random, clearly non-isotropic SPD matrices ``[k, d, d]``."""
    a = torch.randn(k, d, d, dtype=DT, generator=gen)
    return 0.3 * a @ a.transpose(-1, -2) + 0.2 * torch.eye(d, dtype=DT)


def _make_gmm(kind: str, d: int = 2) -> GMM:
    gen = torch.Generator().manual_seed(1234 + d)
    k = 3
    weights = torch.tensor([0.2, 0.5, 0.3], dtype=DT)
    means = 2.0 * torch.randn(k, d, dtype=DT, generator=gen)
    if kind == "iso":  # a different multiple of I per component -> fast path
        covs = torch.tensor([0.3, 0.7, 1.5], dtype=DT)[:, None, None] * torch.eye(d, dtype=DT)
    else:
        covs = _random_spd(k, d, gen)
    return GMM(weights, means, covs)


def _reference(weights, means, covs) -> td.MixtureSameFamily:
    return td.MixtureSameFamily(td.Categorical(probs=torch.as_tensor(weights, dtype=DT)),
                                td.MultivariateNormal(torch.as_tensor(means, dtype=DT),
                                                      covariance_matrix=torch.as_tensor(covs, dtype=DT)))


def _ref_of(g: GMM) -> td.MixtureSameFamily:
    return _reference(g.weights, g.means, g.covs)


def _autograd_score(dist: td.Distribution, x: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(dist.log_prob(x).sum(), x)
    return g


def _midpoint_grid(lo: float, hi: float, h: float, d: int = 2):
    """Midpoints of a square grid of cells of side ``h`` on ``[lo, hi]^d`` and the cell volume."""
    n = int(round((hi - lo) / h))
    c = lo + h * (torch.arange(n, dtype=DT) + 0.5)
    pts = torch.cartesian_prod(*([c] * d))
    return pts, h ** d


KINDS = ["iso", "general"]


# ---------------------------------------------------------------------------------------------- construction
def test_fast_path_detection():
    """``_iso_var`` is set exactly when every covariance is a multiple of I (checked against the fixture design)."""
    iso, gen = _make_gmm("iso"), _make_gmm("general")
    assert iso._iso_var is not None
    torch.testing.assert_close(iso._iso_var, torch.tensor([0.3, 0.7, 1.5], dtype=DT))
    assert gen._iso_var is None
    # a diagonal but anisotropic covariance must NOT take the fast path
    diag = GMM([1.0], [[0.0, 0.0]], [[[1.0, 0.0], [0.0, 2.0]]])
    assert diag._iso_var is None


def test_grid_and_isotropic_constructors():
    """``grid`` puts one equal-weight mode at every point of coords^dim with covariance var*I (checked by hand)."""
    coords = [-4, -2, 0, 2, 4]
    g = GMM.grid(coords, var=0.1)
    expected = {(a, b) for a in coords for b in coords}
    assert {tuple(map(float, m)) for m in g.means} == {tuple(map(float, e)) for e in expected}
    assert g.n_components == 25 and g.dim == 2
    torch.testing.assert_close(g.weights, torch.full((25,), 1 / 25, dtype=DT))
    torch.testing.assert_close(g.covs, 0.1 * torch.eye(2, dtype=DT).expand(25, 2, 2))
    h = GMM.isotropic([[0.0], [1.0]], weights=[1.0, 3.0], var=2.0)
    torch.testing.assert_close(h.weights, torch.tensor([0.25, 0.75], dtype=DT))
    torch.testing.assert_close(h.covs, torch.full((2, 1, 1), 2.0, dtype=DT))


def test_isotropic_list_weights_are_float64_exact():
    """GMM.isotropic(means, weights=[0.1, 0.2, 0.3, 0.4]) keeps the float64 weights 0.1..0.4 (they already sum
    to 1 in float64 up to 1 ulp), so the weights and log-densities agree with the float64 reference to 1e-15."""
    w = [0.1, 0.2, 0.3, 0.4]
    means = [[2.0, 2.0], [2.0, -2.0], [-2.0, 2.0], [-2.0, -2.0]]
    g = GMM.isotropic(means, weights=w, var=1.0)
    torch.testing.assert_close(g.weights, torch.tensor(w, dtype=DT), rtol=1e-15, atol=1e-15)


def test_invalid_inputs_raise():
    """Shape mismatches and negative weights raise ValueError; a non-SPD covariance is rejected."""
    with pytest.raises(ValueError):
        GMM([0.5, 0.5], [[0.0, 0.0]], [[[1.0, 0.0], [0.0, 1.0]]])
    with pytest.raises(ValueError):
        GMM([-1.0, 2.0], [[0.0], [1.0]], [[[1.0]], [[1.0]]])
    with pytest.raises(Exception):
        GMM([1.0], [[0.0, 0.0]], [[[1.0, 2.0], [2.0, 1.0]]])  # indefinite


# ---------------------------------------------------------------------------------------------- densities
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("d", [1, 2, 3])
def test_log_prob_matches_torch_distributions(kind, d):
    """``log_prob`` and ``component_log_probs`` equal MixtureSameFamily(Categorical, MultivariateNormal)."""
    g = _make_gmm(kind, d)
    ref = _ref_of(g)
    x = 3.0 * torch.randn(64, d, dtype=DT, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(g.log_prob(x), ref.log_prob(x), rtol=1e-12, atol=1e-12)
    comp = td.MultivariateNormal(g.means, covariance_matrix=g.covs).log_prob(x[:, None, :]) + torch.log(g.weights)
    torch.testing.assert_close(g.component_log_probs(x), comp, rtol=1e-12, atol=1e-12)
    # responsibilities = Bayes rule with the reference component densities
    torch.testing.assert_close(g.responsibilities(x), torch.softmax(comp, -1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("d", [1, 2, 3])
def test_score_matches_autograd(kind, d):
    """``score`` equals the autograd gradient of the torch.distributions mixture log-density."""
    g = _make_gmm(kind, d)
    x = 3.0 * torch.randn(64, d, dtype=DT, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(g.score(x), _autograd_score(_ref_of(g), x), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_float32_input_is_evaluated_in_float64(kind):
    """float32 inputs give float64 outputs equal to the float64 reference at the same (rounded) points."""
    g = _make_gmm(kind)
    x32 = torch.randn(16, 2, generator=torch.Generator().manual_seed(2))
    out = g.log_prob(x32)
    assert out.dtype == DT
    torch.testing.assert_close(out, _ref_of(g).log_prob(x32.double()), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------- noising
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m,v", [(1.0, 0.0 + 1e-3), (0.8, 0.6), (0.05, 0.9987492177719089)])
def test_noised_matches_reference(kind, m, v):
    """``noised(m, v)`` is the law of m X + v eps: mixture with means m mu_k and covariances m^2 Sigma_k + v^2 I."""
    g = _make_gmm(kind)
    ref = _reference(g.weights, m * g.means, m ** 2 * g.covs + v ** 2 * torch.eye(2, dtype=DT))
    x = 2.0 * torch.randn(64, 2, dtype=DT, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(g.noised(m, v).log_prob(x), ref.log_prob(x), rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("kind", KINDS)
def test_noised_law_by_monte_carlo_moments(kind):
    """Sanity of the noising convention: the mean/covariance of the noised GMM equal the exact moments of
    m X + v eps computed from the prior's moments (E = m E[X], Cov = m^2 Cov[X] + v^2 I)."""
    g = _make_gmm(kind)
    m, v = 0.7, 0.5
    mean = (g.weights[:, None] * g.means).sum(0)
    second = (g.weights[:, None, None] * (g.covs + g.means[:, :, None] * g.means[:, None, :])).sum(0)
    cov = second - torch.outer(mean, mean)
    ng = g.noised(m, v)
    n_mean = (ng.weights[:, None] * ng.means).sum(0)
    n_second = (ng.weights[:, None, None] * (ng.covs + ng.means[:, :, None] * ng.means[:, None, :])).sum(0)
    torch.testing.assert_close(n_mean, m * mean)
    torch.testing.assert_close(n_second - torch.outer(n_mean, n_mean), m ** 2 * cov + v ** 2 * torch.eye(2, dtype=DT))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("d", [1, 2, 3])
def test_noised_score_matches_autograd_per_point(kind, d):
    """``noised_score(x, m, v)`` with a different (m, v) per point equals, point by point, the autograd score of
    the reference mixture with means m mu_k and covariances m^2 Sigma_k + v^2 I."""
    g = _make_gmm(kind, d)
    gen = torch.Generator().manual_seed(4)
    b = 24
    x = 2.5 * torch.randn(b, d, dtype=DT, generator=gen)
    t = torch.rand(b, dtype=DT, generator=gen)
    t[0], t[1] = 1e-6, 1.0
    log_m = -0.25 * t ** 2 * 19.9 - 0.5 * t * 0.1  # VP schedule, independent of iif.schedule
    m, v = torch.exp(log_m), torch.sqrt(1 - torch.exp(2 * log_m))
    out = g.noised_score(x, m, v)
    assert out.dtype == DT and out.shape == (b, d)
    eye = torch.eye(d, dtype=DT)
    for i in range(b):
        ref = _reference(g.weights, m[i] * g.means, m[i] ** 2 * g.covs + v[i] ** 2 * eye)
        torch.testing.assert_close(out[i], _autograd_score(ref, x[i:i + 1])[0], rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("kind", KINDS)
def test_noised_score_with_m1_v0_is_score(kind):
    """With m = 1 and v -> 0 the noised score reduces to the clean score (compared with autograd)."""
    g = _make_gmm(kind)
    x = torch.randn(8, 2, dtype=DT, generator=torch.Generator().manual_seed(5))
    ones = torch.ones(8, dtype=DT)
    torch.testing.assert_close(g.noised_score(x, ones, 1e-7 * ones), _autograd_score(_ref_of(g), x),
                               rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("kind", KINDS)
def test_sample_moments(kind):
    """Sample mean and covariance of ``sample`` match the exact mixture moments (fixed seed, 5-sigma bands)."""
    g = _make_gmm(kind)
    n = 200_000
    x = g.sample(n, generator=torch.Generator().manual_seed(6))
    assert x.shape == (n, 2) and x.dtype == DT
    mean = (g.weights[:, None] * g.means).sum(0)
    cov = (g.weights[:, None, None] * (g.covs + g.means[:, :, None] * g.means[:, None, :])).sum(0) - torch.outer(mean, mean)
    se_mean = torch.sqrt(torch.diagonal(cov) / n)
    assert ((x.mean(0) - mean).abs() < 5 * se_mean).all(), (x.mean(0), mean)
    emp_cov = torch.cov(x.T)
    # SE of a covariance entry <= sqrt((E x^4-ish)/n); use a generous relative band on the scale of the diagonal
    scale = torch.sqrt(torch.outer(torch.diagonal(cov), torch.diagonal(cov)))
    assert ((emp_cov - cov).abs() < 0.02 * scale).all(), (emp_cov, cov)


@pytest.mark.parametrize("kind", ["iso", "general"])
def test_sample_component_frequencies(kind):
    """With far-apart components, the fraction of samples nearest each mean matches the weights
    (chi-square statistic below the 0.999 quantile of chi2(K-1) = 13.8 for K = 3)."""
    w = torch.tensor([0.1, 0.6, 0.3], dtype=DT)
    means = torch.tensor([[-20.0, 0.0], [0.0, 20.0], [20.0, 0.0]], dtype=DT)
    covs = _random_spd(3, 2, torch.Generator().manual_seed(7)) if kind == "general" else \
        torch.eye(2, dtype=DT).expand(3, 2, 2).clone()
    g = GMM(w, means, covs)
    n = 50_000
    x = g.sample(n, generator=torch.Generator().manual_seed(8))
    counts = torch.bincount(torch.cdist(x, means).argmin(1), minlength=3).double()
    chi2 = (((counts - n * w) ** 2) / (n * w)).sum()
    assert chi2 < 13.8, (counts / n, w)


def test_sample_is_reproducible_with_generator():
    """Same generator seed -> identical samples; different seed -> different samples."""
    g = _make_gmm("general")
    a = g.sample(100, generator=torch.Generator().manual_seed(9))
    b = g.sample(100, generator=torch.Generator().manual_seed(9))
    c = g.sample(100, generator=torch.Generator().manual_seed(10))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_nearest_mode_brute_force():
    """``nearest_mode`` equals an explicit loop over means minimising the Euclidean distance."""
    g = GMM.grid([-4, -2, 0, 2, 4], var=0.1)
    x = 5 * torch.randn(300, 2, dtype=DT, generator=torch.Generator().manual_seed(11))
    idx = g.nearest_mode(x)
    for i in range(len(x)):
        d = [float(((x[i] - mu) ** 2).sum()) for mu in g.means]
        assert int(idx[i]) == min(range(len(d)), key=d.__getitem__)


# ---------------------------------------------------------------------------------------------- products
def _product_cases():
    gen = torch.Generator().manual_seed(12)
    p_gen = GMM([0.2, 0.5, 0.3], [[-1.5, 0.5], [1.0, 1.0], [0.5, -1.5]], _random_spd(3, 2, gen))
    q_gen = GMM([0.7, 0.3], [[1.0, -0.5], [-1.0, 1.5]], _random_spd(2, 2, gen))
    p_iso = GMM.isotropic([[-2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, -2.0]], weights=[1, 2, 3, 4], var=0.3)
    q_iso = GMM.isotropic([[1.0, 1.0], [-1.0, -1.0]], weights=[0.25, 0.75], var=1.0)
    return {"general*general": (p_gen, q_gen), "iso*iso": (p_iso, q_iso), "general*iso": (p_gen, q_iso),
            "iso*general": (p_iso, q_gen)}


@pytest.mark.parametrize("case", list(_product_cases()))
def test_product_vs_grid_quadrature(case):
    """``product`` against midpoint quadrature of p*q on [-9, 9]^2 with cell 0.06 (spectrally accurate for
    these smooth, Gaussian-tailed integrands):

    * Z = int p q  equals exp(log Z);
    * the returned mixture integrates to 1 and equals p q / Z pointwise;
    * mode_weights[i] = int w_i N_i(x) q(x) dx / Z.
    """
    p, q = _product_cases()[case]
    pts, dv = _midpoint_grid(-9.0, 9.0, 0.06)
    ref_p, ref_q = _ref_of(p), _ref_of(q)
    log_pq = ref_p.log_prob(pts) + ref_q.log_prob(pts)
    z_quad = torch.exp(log_pq).sum() * dv
    mix, log_z, mode_w = p.product(q)
    torch.testing.assert_close(torch.exp(log_z), z_quad, rtol=1e-9, atol=0)
    lp = mix.log_prob(pts)
    torch.testing.assert_close(torch.exp(lp).sum() * dv, torch.tensor(1.0, dtype=DT), rtol=1e-9, atol=0)
    # pointwise where the density is not negligible (elsewhere both are ~ -inf in float64 anyway)
    mask = log_pq > log_pq.max() - 40
    torch.testing.assert_close(lp[mask], (log_pq - torch.log(z_quad))[mask], rtol=0, atol=1e-8)
    comp = td.MultivariateNormal(p.means, covariance_matrix=p.covs).log_prob(pts[:, None, :]) + torch.log(p.weights)
    mass = torch.exp(comp + ref_q.log_prob(pts)[:, None]).sum(0) * dv / z_quad
    torch.testing.assert_close(mode_w, mass, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(mode_w.sum(), torch.tensor(1.0, dtype=DT))
    assert mix.n_components == p.n_components * q.n_components


def test_product_1d_closed_form():
    """1-D single Gaussians: N(a, A) N(b, B) = N(a; b, A+B) N(c, C), C = AB/(A+B), c = (aB + bA)/(A+B)
    (textbook completing-the-square), checked on the returned mixture and log Z."""
    a, A, b, B = 0.3, 0.5, -1.2, 2.0
    mix, log_z, mw = GMM([1.0], [[a]], [[[A]]]).product(GMM([1.0], [[b]], [[[B]]]))
    expected_logz = -0.5 * math.log(2 * math.pi * (A + B)) - 0.5 * (a - b) ** 2 / (A + B)
    assert abs(float(log_z) - expected_logz) < 1e-13
    assert abs(float(mix.means[0, 0]) - (a * B + b * A) / (A + B)) < 1e-13
    assert abs(float(mix.covs[0, 0, 0]) - A * B / (A + B)) < 1e-13
    assert float(mw[0]) == pytest.approx(1.0, abs=1e-14)
