"""Tests of the VP schedule, the exact GMM base model, the DDPM sampler's kernels and its path log-RND.

References: numerical integration (scipy.integrate.quad) of beta(t); torch.distributions mixtures with the noised
covariances (scores by autograd); the Tweedie posterior mean of a Gaussian mixture in closed form;
torch.distributions Normal densities of the Gaussian kernels; and, for a linear-Gaussian chain, the exact
path laws as multivariate Gaussians with ``torch.distributions.kl_divergence``.
"""
from __future__ import annotations

import math

import pytest
import torch
from scipy import integrate
from torch import distributions as td
from torch import nn

from iif.base_models.gmm_exact import GMMExact
from iif.gmm import GMM
from iif.guidance.base import Guidance
from iif.samplers.ddpm import DDPMSampler, log_rnd_increment
from iif.schedules import RectifiedFlow, VPSchedule

DT = torch.float64
B_MIN, B_MAX = 0.1, 20.0


def _m_quad(t: float, b_min: float = B_MIN, b_max: float = B_MAX) -> float:
    """exp(-1/2 int_0^t beta(s) ds) by adaptive quadrature (independent of the closed form)."""
    val, _ = integrate.quad(lambda s: b_min + s * (b_max - b_min), 0.0, t, epsabs=1e-14, epsrel=1e-13)
    return math.exp(-0.5 * val)


def _m_closed(t):
    """The VP mean coefficient written out here (not taken from iif.schedules)."""
    return torch.exp(-0.25 * t ** 2 * (B_MAX - B_MIN) - 0.5 * t * B_MIN)


# ============================================================================================== schedule
def test_schedule_m2_plus_v2_is_one():
    """m(t)^2 + v(t)^2 == 1 on a dense grid of t in [0, 1] (variance preservation)."""
    s = VPSchedule(B_MIN, B_MAX)
    t = torch.linspace(0, 1, 1001, dtype=DT)
    torch.testing.assert_close(s.m(t) ** 2 + s.v(t) ** 2, torch.ones_like(t), rtol=0, atol=1e-14)


@pytest.mark.parametrize("b_min,b_max", [(0.1, 20.0), (0.5, 5.0)])
def test_schedule_m_matches_integral_of_beta(b_min, b_max):
    """m(t) == exp(-1/2 int_0^t beta(s) ds) with the integral done by scipy quad; beta(t) linear as specified."""
    s = VPSchedule(b_min, b_max)
    for t in [0.0, 1e-4, 0.01, 0.1, 0.37, 0.5, 0.9, 1.0]:
        tt = torch.tensor([t], dtype=DT)
        assert float(s.m(tt)) == pytest.approx(_m_quad(t, b_min, b_max), rel=1e-12, abs=1e-300)
        assert float(s.beta(tt)) == pytest.approx(b_min + t * (b_max - b_min), rel=1e-14)


def test_schedule_v_small_t_is_accurate():
    """For tiny t, v(t)^2 = 1 - m^2 ~ beta_min t + (beta_max - beta_min) t^2 / 2 (Taylor); the stable formula
    must keep full relative accuracy where the naive sqrt(1 - m^2) loses it."""
    s = VPSchedule(B_MIN, B_MAX)
    for t in [1e-12, 1e-9, 1e-6]:
        x = B_MIN * t + 0.5 * (B_MAX - B_MIN) * t ** 2  # = -log m^2
        expected = math.sqrt(x - x ** 2 / 2)  # 1 - exp(-x) to second order
        assert float(s.v(torch.tensor([t], dtype=DT))) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("n", [1, 5, 100])
def test_grid_and_ddpm_kernels(n):
    """The VP grid and the DDPM sampler's kernels on it: t_k = k/N, alphabar_k = m(k/N)^2 (m by quadrature),
    alphabar_0 = 1; kernel k (listed N..1) spans t_k -> t_{k-1}, prod_{j<=k} alpha_j == alphabar_k,
    beta = 1 - alpha in (0, 1)."""
    sched = VPSchedule(B_MIN, B_MAX)
    t = sched.grid(n)
    assert t.shape == (n + 1,) and t.dtype == DT
    torch.testing.assert_close(t, torch.arange(n + 1, dtype=DT) / n)
    abar = sched.alphabar(t)
    ab_ref = torch.tensor([_m_quad(k / n) ** 2 for k in range(n + 1)], dtype=DT)
    torch.testing.assert_close(abar, ab_ref, rtol=1e-11, atol=0)
    assert float(abar[0]) == 1.0
    kernels = DDPMSampler(n).kernels(GMMExact(_priors()["iso"], sched))
    assert [k.k for k in kernels] == list(range(n, 0, -1))
    assert [(k.t, k.s) for k in kernels] == [(float(t[k]), float(t[k - 1])) for k in range(n, 0, -1)]
    alpha = torch.tensor([k.alpha for k in kernels[::-1]], dtype=DT)  # k = 1..N
    beta = torch.tensor([k.beta for k in kernels[::-1]], dtype=DT)
    torch.testing.assert_close(torch.tensor([k.abar for k in kernels[::-1]], dtype=DT), ab_ref[1:], rtol=1e-11, atol=0)
    torch.testing.assert_close(torch.cumprod(alpha, 0), abar[1:], rtol=1e-12, atol=0)
    torch.testing.assert_close(beta, 1 - alpha, rtol=0, atol=1e-15)
    assert ((beta > 0) & (beta < 1)).all()


def test_schedule_invalid():
    """Invalid schedule parameters / step counts raise ValueError."""
    with pytest.raises(ValueError):
        VPSchedule(0.0, 1.0)
    with pytest.raises(ValueError):
        VPSchedule(2.0, 1.0)
    with pytest.raises(ValueError):
        VPSchedule().grid(0)
    with pytest.raises(ValueError):
        VPSchedule().grid(4, spacing="sideways")
    with pytest.raises(ValueError):
        DDPMSampler(4, last_step="sometimes")
    with pytest.raises(ValueError):
        DDPMSampler(0)


# ============================================================================================== gmm_exact
def _priors():
    gen = torch.Generator().manual_seed(20)
    a = torch.randn(3, 2, 2, dtype=DT, generator=gen)
    general = GMM([0.2, 0.3, 0.5], 2 * torch.randn(3, 2, dtype=DT, generator=gen),
                  0.3 * a @ a.transpose(-1, -2) + 0.1 * torch.eye(2, dtype=DT))
    iso = GMM.grid([-4, -2, 0, 2, 4], var=0.1)
    return {"iso": iso, "general": general}


@pytest.mark.parametrize("kind", ["iso", "general"])
def test_gmm_exact_eps_is_minus_v_times_noised_score(kind):
    """eps(x, t) == -v(t) * grad log p_t(x), p_t = sum_k w_k N(m mu_k, m^2 Sigma_k + v^2 I), with the score
    by autograd through torch.distributions (one reference mixture per point, t differs per point)."""
    prior = _priors()[kind]
    base = GMMExact(prior, VPSchedule(B_MIN, B_MAX))
    gen = torch.Generator().manual_seed(21)
    b = 16
    t = torch.rand(b, dtype=DT, generator=gen) * 0.999 + 1e-3
    t[0] = 1.0
    x = 3 * torch.randn(b, 2, dtype=DT, generator=gen)
    out = base.eps(x, t)
    m = _m_closed(t)
    v = torch.sqrt(1 - m ** 2)
    for i in range(b):
        ref = td.MixtureSameFamily(td.Categorical(probs=prior.weights), td.MultivariateNormal(
            m[i] * prior.means, covariance_matrix=m[i] ** 2 * prior.covs + v[i] ** 2 * torch.eye(2, dtype=DT)))
        xi = x[i:i + 1].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(ref.log_prob(xi).sum(), xi)
        torch.testing.assert_close(out[i], -v[i] * g[0], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("kind", ["iso", "general"])
def test_gmm_exact_x0_hat_is_posterior_mean(kind):
    """Tweedie: x0_hat(x, t, eps(x, t)) == E[X_0 | X_t = x], computed independently as the Gaussian-mixture
    posterior mean sum_k pi_k(x) [mu_k + m Sigma_k C_k^{-1} (x - m mu_k)], C_k = m^2 Sigma_k + v^2 I."""
    prior = _priors()[kind]
    base = GMMExact(prior, VPSchedule(B_MIN, B_MAX))
    gen = torch.Generator().manual_seed(22)
    b = 32
    t = torch.rand(b, dtype=DT, generator=gen) * 0.9 + 0.05
    x = 2 * torch.randn(b, 2, dtype=DT, generator=gen)
    m = _m_closed(t)
    v = torch.sqrt(1 - m ** 2)
    got = base.x0_hat(x, t, base.eps(x, t))
    eye = torch.eye(2, dtype=DT)
    for i in range(b):
        C = m[i] ** 2 * prior.covs + v[i] ** 2 * eye
        logp = td.MultivariateNormal(m[i] * prior.means, covariance_matrix=C).log_prob(x[i]) + torch.log(prior.weights)
        pi = torch.softmax(logp, 0)
        post = prior.means + m[i] * (prior.covs @ torch.linalg.solve(C, (x[i] - m[i] * prior.means)[..., None]))[..., 0]
        torch.testing.assert_close(got[i], (pi[:, None] * post).sum(0), rtol=1e-8, atol=1e-9)


def test_gmm_exact_prior_sample_is_standard_normal():
    """prior_sample(n) has shape [n, D] and standard-normal moments (seeded; 5-SE bands)."""
    base = GMMExact(_priors()["iso"], VPSchedule())
    torch.manual_seed(23)
    x = base.prior_sample(100_000).double()
    assert x.shape == (100_000, 2)
    assert (x.mean(0).abs() < 5 / math.sqrt(1e5)).all()
    assert ((x.var(0) - 1).abs() < 5 * math.sqrt(2 / 1e5)).all()


# ============================================================================================== log-RND
def test_log_rnd_increment_matches_gaussian_log_densities():
    """log_rnd_increment(Delta, z, sigma) == sum_d [log N(x'; mu0, sigma^2) - log N(x'; mu0 + Delta, sigma^2)] with
    x' = mu0 + Delta + sigma z, by torch.distributions.Normal (random mu0, multi-dim sample shape)."""
    gen = torch.Generator().manual_seed(30)
    for sigma in [0.05, 0.7, 2.0]:
        mu0 = torch.randn(50, 3, 2, dtype=DT, generator=gen)
        delta = 0.8 * torch.randn(50, 3, 2, dtype=DT, generator=gen)
        z = torch.randn(50, 3, 2, dtype=DT, generator=gen)
        xp = mu0 + delta + sigma * z
        ref = (td.Normal(mu0, sigma).log_prob(xp) - td.Normal(mu0 + delta, sigma).log_prob(xp)).flatten(1).sum(1)
        got = log_rnd_increment(delta, z, sigma)
        assert got.dtype == DT and got.shape == (50,)
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
        # tensor-valued sigma and float32 inputs are accumulated in float64
        got32 = log_rnd_increment(delta.float(), z.float(), torch.tensor(sigma))
        assert got32.dtype == DT
        torch.testing.assert_close(got32, ref, rtol=1e-5, atol=1e-4)


class _MLPGuidance(Guidance):
    """A fixed random MLP h(x, t, x0_hat) with a non-zero output layer."""

    def __init__(self, dim: int = 2, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(2 * dim + 1, 32), nn.Tanh(), nn.Linear(32, dim))
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=g))

    def forward(self, x, t, x0_hat, cond=None):
        return self.net(torch.cat([x, x0_hat, t[:, None]], -1))


class _ZeroGuidance(Guidance):
    def forward(self, x, t, x0_hat, cond=None):
        return torch.zeros_like(x)


class _LinearGuidance(Guidance):
    """h(x, t) = a(t) x + c(t), a(t) = a0 + a1 t, c(t) = c0 + c1 t (ignores x0_hat)."""

    def __init__(self, a0=0.4, a1=-0.38, c0=0.6, c1=-0.55):
        super().__init__()
        self.a0, self.a1, self.c0, self.c1 = a0, a1, c0, c1

    def a(self, t):
        return self.a0 + self.a1 * t

    def c(self, t):
        return self.c0 + self.c1 * t

    def forward(self, x, t, x0_hat, cond=None):
        return self.a(t)[:, None] * x + self.c(t)[:, None]


def _recompute_log_rnd(base, guidance, states, n_steps, n_guided=None):
    """sum_k log N(x_{k-1}; mu0(x_k), beta_k I) - log N(x_{k-1}; mu0(x_k) + Delta(x_k), beta_k I) from the stored
    states, with the schedule written out here (alphabar_k = m(k/N)^2) and the base's eps at the stored states;
    over the first ``n_guided`` steps (k = N..N-n_guided+1; default all N)."""
    t_grid = torch.arange(n_steps + 1, dtype=DT) / n_steps
    ab = _m_closed(t_grid) ** 2
    total = torch.zeros(states.shape[1], dtype=DT)
    cost = torch.zeros(states.shape[1], dtype=DT)
    for i, k in enumerate(range(n_steps, 0, -1)):
        if n_guided is not None and i >= n_guided:
            break
        x, x_next = states[i], states[i + 1]
        alpha = ab[k] / ab[k - 1]
        beta = 1 - alpha
        t = torch.full((x.shape[0],), float(t_grid[k]), dtype=x.dtype)
        eps = base.eps(x, t)
        mu0 = (x - beta / torch.sqrt(1 - ab[k]) * eps) / torch.sqrt(alpha)
        delta = beta / torch.sqrt(alpha) * guidance(x, t, base.x0_hat(x, t, eps))
        sd = torch.sqrt(beta)
        total += (td.Normal(mu0, sd).log_prob(x_next) - td.Normal(mu0 + delta, sd).log_prob(x_next)).sum(-1)
        cost += (delta ** 2).sum(-1) / (2 * beta)
    return total, cost


@pytest.mark.parametrize("kind", ["iso", "general"])
def test_trajectory_log_rnd_recomputed_from_states(float64_default, kind):
    """traj.log_rnd (log dP^0/dP^h, accumulated on the fly) equals the sum over steps of the two Gaussian kernel
    log-densities at the stored states (float64 run, 1e-9 relative); control_cost equals sum ||Delta||^2/(2 beta);
    the stored noises reproduce the states through x' = mu0 + Delta + sqrt(beta) z."""
    base = GMMExact(_priors()[kind], VPSchedule(B_MIN, B_MAX))
    guid = _MLPGuidance(seed=31)
    n_steps = 12
    torch.manual_seed(32)
    traj = DDPMSampler(n_steps).sample(base, guid, 64, keep_states=True)
    assert traj.states.shape == (n_steps + 1, 64, 2) and traj.noises.shape == (n_steps, 64, 2)
    assert traj.states.dtype == DT and traj.nfe == n_steps
    assert torch.equal(traj.x0, traj.states[-1])
    ref, cost = _recompute_log_rnd(base, guid, traj.states, n_steps)
    assert ref.abs().mean() > 0.1  # the guidance is far from zero: the test is discriminative
    torch.testing.assert_close(traj.log_rnd, ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(traj.control_cost, cost, rtol=1e-10, atol=1e-12)
    # the noises are the standardised residuals of the guided kernel
    t_grid = torch.arange(n_steps + 1, dtype=DT) / n_steps
    ab = _m_closed(t_grid) ** 2
    for i, k in enumerate(range(n_steps, 0, -1)):
        x = traj.states[i]
        alpha, beta = ab[k] / ab[k - 1], 1 - ab[k] / ab[k - 1]
        t = torch.full((64,), float(t_grid[k]))
        eps = base.eps(x, t)
        mean = (x - beta / torch.sqrt(1 - ab[k]) * eps + beta * guid(x, t, base.x0_hat(x, t, eps))) / torch.sqrt(alpha)
        torch.testing.assert_close(traj.states[i + 1], mean + torch.sqrt(beta) * traj.noises[i], rtol=1e-10, atol=1e-10)


def test_trajectory_log_rnd_float32_default():
    """Same recomputation with the default float32 states (the production dtype): agreement to float32
    rounding (the RND itself is accumulated in float64)."""
    base = GMMExact(_priors()["iso"], VPSchedule(B_MIN, B_MAX))
    guid = _MLPGuidance(seed=33).float()
    torch.manual_seed(34)
    traj = DDPMSampler(10).sample(base, guid, 64, keep_states=True)
    assert traj.log_rnd.dtype == DT and traj.control_cost.dtype == DT
    ref, cost = _recompute_log_rnd(base, lambda x, t, x0: guid(x.float(), t.float(), x0.float()).double(),
                                   traj.states.double(), 10)
    torch.testing.assert_close(traj.log_rnd, ref, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(traj.control_cost, cost, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("guidance", ["zeros", "none"])
def test_zero_guidance_gives_zero_rnd(guidance):
    """h == 0 (or no guidance) -> log dP^0/dP^h == 0 exactly and control cost 0, for every path."""
    base = GMMExact(_priors()["iso"], VPSchedule())
    torch.manual_seed(35)
    g = _ZeroGuidance() if guidance == "zeros" else None
    traj = DDPMSampler(20).sample(base, g, 128)
    assert torch.equal(traj.log_rnd, torch.zeros(128, dtype=DT))
    assert torch.equal(traj.control_cost, torch.zeros(128, dtype=DT))


def test_zero_guidance_reproduces_unguided_chain():
    """With the same seed, h == 0 and h = None produce identical samples (the guidance only shifts the mean)."""
    base = GMMExact(_priors()["general"], VPSchedule())
    torch.manual_seed(36)
    a = DDPMSampler(15).sample(base, _ZeroGuidance(), 32).x0
    torch.manual_seed(36)
    b = DDPMSampler(15).sample(base, None, 32).x0
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- linear-Gaussian KL
def _linear_gaussian_path_law(mu_p, s_p, guid, n_steps, guided):
    """Exact Gaussian law of (x_N, ..., x_0) for the DDPM chain with the 1-D prior N(mu_p, s_p^2): the base
    eps(x, t) = v (x - m mu_p) / (m^2 s_p^2 + v^2) is linear, so each step is x' = A_k x + b_k + sqrt(beta_k) z_k.
    Built by propagating X = M xi + c with xi = (x_N, z_N, ..., z_1) ~ N(0, I)."""
    t_grid = torch.arange(n_steps + 1, dtype=DT) / n_steps
    m_all = _m_closed(t_grid)
    M = torch.zeros(n_steps + 1, n_steps + 1, dtype=DT)
    c = torch.zeros(n_steps + 1, dtype=DT)
    M[0, 0] = 1.0
    for i, k in enumerate(range(n_steps, 0, -1), start=1):
        m, m_prev = m_all[k], m_all[k - 1]
        v2 = 1 - m ** 2
        alpha = m ** 2 / m_prev ** 2
        beta = 1 - alpha
        C = m ** 2 * s_p ** 2 + v2
        A = (1 - beta / C) / torch.sqrt(alpha)
        b = beta * m * mu_p / (C * torch.sqrt(alpha))
        if guided:
            tk = t_grid[k]
            A = A + beta * guid.a(tk) / torch.sqrt(alpha)
            b = b + beta * guid.c(tk) / torch.sqrt(alpha)
        M[i] = A * M[i - 1]
        M[i, i] = torch.sqrt(beta)
        c[i] = A * c[i - 1] + b
    return td.MultivariateNormal(c, scale_tril=M)  # M is lower triangular with positive diagonal


def test_on_policy_mean_log_rnd_is_minus_kl_linear_gaussian(float64_default):
    """Linear-Gaussian chain (1-D prior N(1.5, 0.5^2), h(x,t) = (0.4 - 0.38 t) x + 0.6 - 0.55 t, N = 8): both path laws
    are Gaussian; KL(P^h || P^0) by torch kl_divergence.  Over 20000 on-policy paths,
    mean(log_rnd) == -KL and mean(control_cost) == KL within 4 standard errors (and mean log_rnd <= 0);
    also the sampled x_0 has the exact mean/variance of the guided path law."""
    mu_p, s_p, n_steps, n = 1.5, 0.5, 8, 20_000
    base = GMMExact(GMM([1.0], [[mu_p]], [[[s_p ** 2]]]), VPSchedule(B_MIN, B_MAX))
    guid = _LinearGuidance()
    p_h = _linear_gaussian_path_law(mu_p, s_p, guid, n_steps, guided=True)
    p_0 = _linear_gaussian_path_law(mu_p, s_p, guid, n_steps, guided=False)
    kl = float(td.kl_divergence(p_h, p_0))
    assert 1.0 < kl < 5.0  # discriminative: sign errors / factor-2 errors would be many SEs off
    torch.manual_seed(40)
    traj = DDPMSampler(n_steps).sample(base, guid, n, keep_states=True)
    lr, cc = traj.log_rnd, traj.control_cost
    se_lr = float(lr.std()) / math.sqrt(n)
    se_cc = float(cc.std()) / math.sqrt(n)
    assert float(lr.mean()) <= 0
    assert abs(float(lr.mean()) + kl) < 4 * se_lr, (float(lr.mean()), -kl, se_lr)
    assert abs(float(cc.mean()) - kl) < 4 * se_cc, (float(cc.mean()), kl, se_cc)
    # the law of the sampled x_0 (last coordinate of the path) is the exact guided marginal
    mean0, var0 = float(p_h.mean[-1]), float(p_h.covariance_matrix[-1, -1])
    x0 = traj.x0[:, 0]
    assert abs(float(x0.mean()) - mean0) < 4 * math.sqrt(var0 / n)
    assert abs(float(x0.var()) - var0) < 4 * var0 * math.sqrt(2 / n)
    # and the per-path log-RND equals the log-ratio of the two exact path densities (a pathwise identity)
    paths = traj.states[:, :, 0].T  # [n, N+1] in the order x_N, ..., x_0
    torch.testing.assert_close(lr[:200], (p_0.log_prob(paths) - p_h.log_prob(paths))[:200], rtol=1e-8, atol=1e-8)


def test_unguided_chain_matches_exact_linear_gaussian_marginal(float64_default):
    """The unguided DDPM chain on the 1-D Gaussian prior has the exact x_0 law of the linear recursion
    (checks the base mean mu0 formula, independently of the RND)."""
    mu_p, s_p, n_steps, n = -0.7, 0.3, 6, 20_000
    base = GMMExact(GMM([1.0], [[mu_p]], [[[s_p ** 2]]]), VPSchedule(B_MIN, B_MAX))
    p_0 = _linear_gaussian_path_law(mu_p, s_p, _LinearGuidance(), n_steps, guided=False)
    torch.manual_seed(41)
    x0 = DDPMSampler(n_steps).sample(base, None, n).x0[:, 0]
    mean0, var0 = float(p_0.mean[-1]), float(p_0.covariance_matrix[-1, -1])
    assert abs(float(x0.mean()) - mean0) < 4 * math.sqrt(var0 / n)
    assert abs(float(x0.var()) - var0) < 4 * var0 * math.sqrt(2 / n)


# ---------------------------------------------------------------------------------------------- DDPM kernels
def test_ddpm_kernels_reproduce_the_vp_step_maths():
    """For the VP path and N = 7, kernel k (t_k = k/N) has, with m written out here:
    alpha_k = m(t_k)^2 / m(t_{k-1})^2, beta_k = 1 - alpha_k, alphabar_k = m(t_k)^2,
    base_mean(x, eps) = (x - beta_k / sqrt(1 - alphabar_k) eps) / sqrt(alpha_k), shift_coef = beta_k / sqrt(alpha_k),
    std = sqrt(beta_k), var = beta_k, and is guided (the DDPM step maths of the sampler before kernels)."""
    n = 7
    base = GMMExact(_priors()["general"], VPSchedule(B_MIN, B_MAX))
    kernels = DDPMSampler(n).kernels(base)
    assert len(kernels) == n
    gen = torch.Generator().manual_seed(50)
    x = torch.randn(16, 2, dtype=DT, generator=gen)
    eps = torch.randn(16, 2, dtype=DT, generator=gen)
    h = torch.randn(16, 2, dtype=DT, generator=gen)
    for kern, k in zip(kernels, range(n, 0, -1)):
        t_k, t_prev = torch.tensor(k / n, dtype=DT), torch.tensor((k - 1) / n, dtype=DT)
        abar = _m_closed(t_k) ** 2
        alpha = abar / _m_closed(t_prev) ** 2
        beta = 1 - alpha
        assert kern.k == k and kern.t == k / n and kern.s == (k - 1) / n
        assert kern.alpha == pytest.approx(float(alpha), rel=1e-15, abs=0)
        assert kern.beta == pytest.approx(float(beta), rel=1e-14, abs=0)
        assert kern.abar == pytest.approx(float(abar), rel=1e-15, abs=0)
        assert kern.shift_coef == pytest.approx(float(beta / alpha.sqrt()), rel=1e-14, abs=0)
        assert kern.std == pytest.approx(float(beta.sqrt()), rel=1e-14, abs=0)
        assert kern.var == pytest.approx(float(beta), rel=1e-14, abs=0)
        assert kern.guided is True
        ref = (x - beta / torch.sqrt(1 - abar) * eps) / torch.sqrt(alpha)
        torch.testing.assert_close(kern.base_mean(x, eps), ref, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(kern.shift(h), beta / torch.sqrt(alpha) * h, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(kern.times(3, DT), torch.full((3,), k / n, dtype=DT), rtol=0, atol=0)


def test_ddpm_noiseless_last_step_is_the_unguided_tweedie_step(float64_default):
    """DDPMSampler(last_step="noiseless"): the last kernel (k = 1) has std 0 and is unguided, so x_0 is the base's
    Tweedie estimate at t_1 given x_1 (here with m, v written out), its noise is 0, the steps before it are those of
    the default sampler (same draws), and the log-RND is the sum over the first N - 1 steps only (recomputed from
    the stored states with Gaussian densities, and from the stored noises)."""
    n_steps, n = 9, 64
    base = GMMExact(_priors()["general"], VPSchedule(B_MIN, B_MAX))
    sampler = DDPMSampler(n_steps, last_step="noiseless")
    kernels = sampler.kernels(base)
    assert kernels[-1].k == 1 and kernels[-1].std == 0 and kernels[-1].var == 0 and kernels[-1].guided is False
    assert all(k.guided and k.std > 0 for k in kernels[:-1])
    guid = _MLPGuidance(seed=51)
    torch.manual_seed(52)
    traj = sampler.sample(base, guid, n, keep_states=True)
    torch.manual_seed(52)
    noisy = DDPMSampler(n_steps).sample(base, guid, n, keep_states=True)
    # the first N - 1 steps are the default sampler's
    torch.testing.assert_close(traj.states[:-1], noisy.states[:-1], rtol=0, atol=0)
    assert torch.equal(traj.noises[-1], torch.zeros_like(traj.noises[-1]))
    # x_0 = E[x_0 | x_1] of the base: (x_1 - v(t_1) eps(x_1, t_1)) / m(t_1)
    x1 = traj.states[-2]
    t1 = torch.full((n,), 1 / n_steps, dtype=DT)
    m1 = _m_closed(torch.tensor(1 / n_steps, dtype=DT))
    tweedie = (x1 - torch.sqrt(1 - m1 ** 2) * base.eps(x1, t1)) / m1
    torch.testing.assert_close(traj.x0, tweedie, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(traj.x0_hats[-1], tweedie, rtol=1e-10, atol=1e-10)
    assert (traj.x0 - noisy.x0).abs().max() > 1e-2  # the default sampler's last step differs (noise, guidance)
    # the log-RND of the first N - 1 steps, from the states
    ref, cost = _recompute_log_rnd(base, guid, traj.states, n_steps, n_guided=n_steps - 1)
    assert ref.abs().mean() > 0.1
    torch.testing.assert_close(traj.log_rnd, ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(traj.control_cost, cost, rtol=1e-10, atol=1e-12)
    # ... and from the noises: -sum_k ||Delta_k||^2 / (2 beta_k) + <Delta_k, z_k> / sqrt(beta_k)
    t_grid = torch.arange(n_steps + 1, dtype=DT) / n_steps
    ab = _m_closed(t_grid) ** 2
    from_noises = torch.zeros(n, dtype=DT)
    for i, k in enumerate(range(n_steps, 1, -1)):
        x = traj.states[i]
        beta = 1 - ab[k] / ab[k - 1]
        t = torch.full((n,), float(t_grid[k]))
        delta = beta / torch.sqrt(1 - beta) * guid(x, t, base.x0_hat(x, t, base.eps(x, t)))
        from_noises -= (delta ** 2).sum(-1) / (2 * beta) + (delta * traj.noises[i]).sum(-1) / torch.sqrt(beta)
    torch.testing.assert_close(traj.log_rnd, from_noises, rtol=1e-9, atol=1e-9)
    # the last step would have added -||Delta_1||^2 / (2 beta_1) had it been counted: not negligible here
    x = traj.states[-2]
    beta1 = 1 - ab[1]
    delta1 = beta1 / torch.sqrt(1 - beta1) * guid(x, t1, base.x0_hat(x, t1, base.eps(x, t1)))
    assert ((delta1 ** 2).sum(-1) / (2 * beta1)).mean() > 1e-3


def test_ddpm_refuses_a_path_that_is_not_variance_preserving():
    """DDPM's kernels need alpha^2 + sigma^2 = 1; on rectified flow the sampler says to use ddim."""
    base = GMMExact(_priors()["iso"], RectifiedFlow())
    with pytest.raises(ValueError, match="ddim"):
        DDPMSampler(5).kernels(base)
    with pytest.raises(ValueError, match="ddim"):
        DDPMSampler(5).sample(base, None, 4)
