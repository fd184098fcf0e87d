"""The unified tilting paper's pieces on the shared core, against independent references: the path works'
Jarzynski/Crooks identities (exact in discrete time) against the closed-form log Z of a Gaussian tilted by a
quadratic, the sampler's on-the-fly backward log-density against torch.distributions along kept paths, the score
targets' conditional means against the closed-form tilted score and their variances at both ends, adjoint
sampling's transported adjoint against autograd through the base chain, and the sampling methods trained on the 2-D
Gaussian problem against its exact target."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from iif.base_models.gmm_exact import GMMExact
from iif.config import compose
from iif.energies.gaussian import QuadraticEnergy
from iif.gmm import GMM
from iif.metrics.log_z import bar, crooks, jarzynski
from iif.methods.base import Method
from iif.metrics.works import forward_works, reverse_works
from iif.rewards.base import Reward
from iif.rewards.energy import EnergyReward
from iif.samplers.ddpm import DDPMSampler
from iif.samplers.flow_sde import FlowSDESampler
from iif.schedules.rectified_flow import RectifiedFlow
from iif.schedules.vp import VPSchedule
from iif.score_targets import Conditional, Mixed, TargetScore
from iif.train import train

# the works' exponentials have finite variance both ways when the sampler's and the target's precisions are within a
# factor 2 of each other (base N(0, I), P's eigenvalues 1.37 and 0.73)
P = torch.tensor([[1.2, 0.3], [0.3, 0.9]], dtype=torch.float64)
M = torch.tensor([1.0, -0.5], dtype=torch.float64)
LOG_Z = math.log(2 * math.pi) - 0.5 * math.log(torch.det(P).item())  # int exp(-(x-m)^T P (x-m)/2) dx, d = 2


class Affine(nn.Module):
    """A fixed, non-trivial guidance ``h(x, t) = A(t) x + c(t)`` (test-local)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.a = nn.Parameter(0.2 * torch.randn(2, 2, generator=g))
        self.c = nn.Parameter(0.5 * torch.randn(2, generator=g))

    def forward(self, x, t, x0_hat, cond=None):
        return (1 - t)[:, None] * (x @ self.a.T + self.c)


class _Fixed(Method):
    """A method that samples with a fixed guidance (test-local)."""

    def fit_step(self, iteration):
        return {}


def _problem(n_steps=20, sampler=DDPMSampler):
    base = GMMExact(GMM.isotropic([[0.0, 0.0]], var=1.0), VPSchedule())
    reward = EnergyReward(QuadraticEnergy(M.tolist(), P.tolist()), GMM.isotropic([[0.0, 0.0]], var=1.0))
    return base, reward, sampler(n_steps)


def _em(n_steps):
    return FlowSDESampler(n_steps, last_step="noise")


@pytest.mark.parametrize("sampler,n_steps", [(DDPMSampler, 20), (_em, 50)], ids=["ddpm", "em"])
def test_path_works_give_exact_log_z_for_any_guidance(sampler, n_steps):
    """E[e^W] = Z under P^h and E[e^-W] = 1/Z under p_tilt x noising chain, exactly on the discrete chain (the
    Euler–Maruyama chain's works spread more: 50 steps keep the estimators' error within the tolerance)."""
    torch.manual_seed(0)
    base, reward, sampler = _problem(n_steps, sampler=sampler)
    guide = Affine()
    method = _Fixed(base, reward, sampler, guide)
    log_gamma = lambda x: -reward.energy(x.double())  # noqa: E731  log p_base + r = -E
    w_f = forward_works(sampler.sample(base, guide, 40_000), log_gamma)
    x_tilt = torch.distributions.MultivariateNormal(M, precision_matrix=P).sample((40_000,))
    w_r = reverse_works(method, x_tilt, log_gamma)
    assert w_f.std() > 0.3  # a poor sampler: the identities are not trivially met
    assert abs(jarzynski(w_f) - LOG_Z) < 0.03
    assert abs(crooks(w_r) - LOG_Z) < 0.03
    assert abs(bar(w_f, w_r) - LOG_Z) < 0.02
    assert w_f.mean() < LOG_Z < w_r.mean()


def test_backward_log_density_accumulated_on_the_fly():
    """``log_rnd + log_backward = log q(x_{1:N}|x_0) - log P^h(x_{0:N})`` along kept paths, the densities written out
    with torch.distributions."""
    torch.manual_seed(0)
    base, _, sampler = _problem(n_steps=8)
    guide = Affine()
    traj = sampler.sample(base, guide, 64, keep_states=True)
    normal = torch.distributions.Normal
    log_q = torch.zeros(64, dtype=torch.float64)
    log_p = normal(0.0, 1.0).log_prob(traj.states[0].double()).sum(1)
    for i, k in enumerate(sampler.kernels(base)):
        x_t, x_s = traj.states[i].double(), traj.states[i + 1].double()
        ab_t, ab_s = (base.schedule.alphabar(torch.tensor(v, dtype=torch.float64)) for v in (k.t, k.s))
        log_q += normal((ab_t / ab_s).sqrt() * x_s, (1 - ab_t / ab_s).sqrt()).log_prob(x_t).sum(1)
        t = torch.full((64,), k.t)
        mean = traj.base_means[i].double() + k.shift_coef * guide(traj.states[i], t, traj.x0_hats[i]).double()
        log_p += normal(mean, k.std).log_prob(x_s).sum(1)
    torch.testing.assert_close(traj.log_rnd + traj.log_backward, log_q - log_p, rtol=0, atol=2e-3)


@pytest.mark.parametrize("n_steps", [10, 200])
def test_em_sampler_matches_the_discrete_gaussian_recursion(n_steps):
    """sampler=em on N(m, s^2) data (VP path): x_s = (1 - f dt) x + (g^2 dt / sigma) * (-eps) + g sqrt(dt) z with the exact
    eps = sigma (x - alpha m)/(alpha^2 s^2 + sigma^2) is affine, so the terminal law is N(m_K, P_K) by the mean and
    variance recursions written out here; at 200 steps it is close to the data law."""
    torch.manual_seed(0)
    m, s2, path = 1.5, 0.36, VPSchedule()
    base = GMMExact(GMM.isotropic([[m]], var=s2), path)
    x = _em(n_steps).sample(base, None, 200_000).x0.double()[:, 0]
    grid = torch.arange(n_steps + 1, dtype=torch.float64) / n_steps
    mean, var = torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    for k in range(n_steps, 0, -1):
        t, dt = grid[k], grid[k] - grid[k - 1]
        a, sg, beta = path.alpha(t), path.sigma(t), path.beta(t)  # f = -beta/2, g^2 = beta
        v_t = a * a * s2 + sg * sg
        slope = 1 + beta * dt / 2 - beta * dt / v_t  # d mean / d x:  (1 - f dt) - g^2 dt / v_t
        mean, var = slope * mean + beta * dt * a * m / v_t, slope ** 2 * var + beta * dt
    se = math.sqrt(var / len(x))
    assert abs(x.mean().item() - mean.item()) < 4 * se
    assert abs(x.var().item() / var.item() - 1) < 4 * math.sqrt(2 / len(x))
    if n_steps == 200:
        assert abs(mean.item() - m) < 0.02 and abs(var.item() - s2) < 0.02


@pytest.mark.parametrize("t", [0.05, 0.5, 0.95])
def test_score_targets_are_unbiased(t):
    """E[Y | x_t] = s*_t(x_t) = -(x_t - alpha m')/(alpha^2 s'^2 + sigma^2) for x_0 ~ N(m', s'^2): least squares of
    Y on (1, x_t) recovers the closed form's slope and intercept."""
    torch.manual_seed(0)
    m, s2 = 1.5, 0.25
    path = VPSchedule()
    tt = torch.tensor([t], dtype=torch.float64)
    a, s = path.alpha(tt).item(), path.sigma(tt).item()
    x0 = m + math.sqrt(s2) * torch.randn(400_000, 1, dtype=torch.float64)
    xt = a * x0 + s * torch.randn_like(x0)
    score = -(x0 - m) / s2
    design = torch.cat([torch.ones_like(xt), xt], 1)
    var_t = a * a * s2 + s * s
    for target in (Conditional(), TargetScore(), Mixed()):
        y = target(x0, xt, torch.tensor(a), torch.tensor(s), score)
        coef = torch.linalg.lstsq(design, y).solution[:, 0]
        resid_sd = (y - design @ coef[:, None]).std().item()
        se = resid_sd / math.sqrt(len(y)) * 4  # about 4 standard errors, slope and intercept alike (x_t is O(1))
        assert abs(coef[1].item() + 1 / var_t) < se * 3 + 1e-3, target
        assert abs(coef[0].item() - a * m / var_t) < se * 3 + 1e-3, target


def test_mixed_target_variance_finite_where_csm_and_tsm_diverge():
    """Under path-KL weighting g(t)^2 on the rectified-flow path (alpha = 1 - t reaches 0): g^2 Var(Y | x_t) grows
    without bound for CSM as t -> 0 (~ 2/t) and for TSM as t -> 1 (~ 1/(1 - t)^3), and stays bounded for the mixed
    target (x_0 ~ N(m', s'^2), the conditional variance in closed form: Var(x_0 | x_t) = s'^2 sigma^2 /
    (alpha^2 s'^2 + sigma^2))."""
    s2, path = 0.25, RectifiedFlow(t_max=0.99999)

    def weighted_var(target, t):
        tt = torch.tensor([t], dtype=torch.float64)
        a, s, g2 = path.alpha(tt).item(), path.sigma(tt).item(), path.diffusion_sq(tt).item()
        v0 = s2 * s * s / (a * a * s2 + s * s)  # Var(x_0 | x_t)
        # Y is affine in x_0 given x_t: Y = c x_0 + const, with c from the target at two points
        one, zero = torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64)
        y = lambda x0: target(x0, zero, torch.tensor(a), torch.tensor(s), -x0 / s2).item()  # noqa: E731
        return g2 * (y(one) - y(zero)) ** 2 * v0

    near_data, near_noise = [1e-3, 1e-5], [0.99, 0.9999]
    csm = [weighted_var(Conditional(), t) for t in near_data]
    tsm = [weighted_var(TargetScore(), t) for t in near_noise]
    assert csm[1] > 50 * csm[0]  # ~ 1/t: two decades of t, two of variance
    assert tsm[1] > 1e5 * tsm[0]  # ~ 1/(1 - t)^3
    nsm = [weighted_var(Mixed(), t) for t in [*near_data, 0.5, *near_noise]]
    assert max(nsm) < 10 and max(nsm) < min(csm[1], tsm[1]) / 100


def test_adjoint_sampling_transport_matches_autograd_through_the_chain():
    """a_k = a_0 M_k equals the gradient of <a_0, x_0> w.r.t. x_k through the deterministic base chain."""
    from iif.buffers.fifo import FIFOBuffer
    from iif.guidance.mlp import MLPGuidance
    from iif.methods.adjoint_sampling import AdjointSampling

    base, reward, sampler = _problem(n_steps=6)
    method = AdjointSampling(base, reward, sampler, MLPGuidance(base), FIFOBuffer(64, 0),
                             optimizer=lambda p: torch.optim.Adam(p))
    kernels = sampler.kernels(base)
    a0 = torch.randn(3, 2)
    for i in (0, 3, 5):
        x = torch.randn(3, 2, requires_grad=True)
        y = x
        for k in kernels[i:]:
            y = k.base_mean(y, base.eps(y, k.times(3)))
        (g,) = torch.autograd.grad((y * a0).sum(), x)
        torch.testing.assert_close(a0 @ method._transport[i], g, rtol=1e-4, atol=1e-5)


def test_adjoint_sampling_refuses_a_non_gaussian_base():
    with pytest.raises(Exception, match="Gaussian data law"):
        cfg, choices = compose(["method=as", "debug=fast", "logger=none", "base_model=gmm_exact"])
        from iif.build import build
        build(cfg)


class LinearReward(Reward):
    """``r(x) = b x`` in 1-D (test-local)."""

    def __init__(self, b):
        super().__init__()
        self.b = b

    def evaluate(self, x, cond=None):
        return self.b * x[:, 0]


# the 1-D NETS problem of E7(b): base N(0, S2) on the VP path, r = B x, path gamma_t = p^base_t e^{(1-t) B x}
S2, B = 0.7, 1.3
VP = VPSchedule()


def _var(t):
    """``V(t) = alpha^2 S2 + sigma^2``, the base marginal's variance; pi_t = N(kappa B V, V), kappa = 1 - t."""
    return VP.alpha(t) ** 2 * S2 + VP.sigma(t) ** 2


def _exact_correction(t):
    """``c*(t) = B (V + kappa dV/dtau / 2)``: a linear field transporting pi_t minus the base's velocity."""
    with torch.enable_grad():
        tt = t.detach().double().requires_grad_(True)
        (dv_dt,) = torch.autograd.grad(_var(tt).sum(), tt)
    return B * (_var(t.double()) - (1 - t.double()) * dv_dt / 2)


class ExactControl(nn.Module):
    """``u = c* / g^2`` (test-local)."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()))

    def forward(self, x, t, x0_hat, cond=None):
        return (_exact_correction(t) / VP.diffusion_sq(t.double())).to(x.dtype)[:, None].expand_as(x)


class AffineControl(nn.Module):
    """A fixed wrong control ``u = (1 - t)(a x + c)`` (test-local; a = c = 0: no correction)."""

    def __init__(self, a, c):
        super().__init__()
        self.a, self.c = nn.Parameter(torch.tensor(a)), nn.Parameter(torch.tensor(c))

    def forward(self, x, t, x0_hat, cond=None):
        return (1 - t).to(x.dtype)[:, None] * (self.a * x + self.c)


def _nets_1d(control, n_steps=10, **kwargs):
    from iif.methods.nets import NETS

    base = GMMExact(GMM.isotropic([[0.0]], var=S2), VP)
    return NETS(base, LinearReward(B), DDPMSampler(n_steps), control, optimizer=lambda p: torch.optim.Adam(p),
                **kwargs)


def test_nets_escorted_estimate_needs_two_paths():
    for bad in (-1, 1):
        with pytest.raises(ValueError, match="escorted_paths must be 0 \\(off\\) or >= 2"):
            _nets_1d(ExactControl(), escorted_paths=bad)


def test_nets_escorted_estimate_takes_the_first_paths_in_chunks():
    """The escorted estimate uses exactly the first ``escorted_paths`` (or ``m``) paths of a batch, however the works
    are chunked: ``log mean exp A`` of those paths' works, computed here at once."""
    method = _nets_1d(AffineControl(0.2, 0.2), 10, escorted_paths=4)
    torch.manual_seed(0)
    traj = method.sampler.sample(method.base, method.guidance, 10, keep_states=True)
    works = method.escorted_works(traj.states).double()
    assert works.std() > 0.01  # distinct works: a wrong selection shows

    def log_mean_exp(w):
        return (torch.logsumexp(w, 0) - math.log(len(w))).item()

    assert method._escorted_estimate(traj, None)["log_z_escorted"] == pytest.approx(log_mean_exp(works[:4]))
    method.WORK_CHUNK = 3  # chunks of 3, 3, 1
    assert method._escorted_estimate(traj, None, 7)["log_z_escorted"] == pytest.approx(log_mean_exp(works[:7]))


def test_nets_residual_vanishes_at_the_exact_transport():
    """The PINN residual of the 1-D problem is 0 at every x, t at the exact correction ``c*`` and the exact
    ``log Z_t = kappa^2 B^2 V / 2``; a wrong correction leaves one."""
    method = _nets_1d(ExactControl())
    method.guidance.free_energy = lambda t: 0.5 * (1 - t) ** 2 * B ** 2 * _var(t)  # exact log Z_t
    torch.manual_seed(0)
    t = 0.02 + 0.96 * torch.rand(256, dtype=torch.float64)
    x = 3 * torch.randn(256, 1, dtype=torch.float64)
    torch.testing.assert_close(method.residual(x, t), torch.zeros(256, dtype=torch.float64), rtol=0, atol=1e-8)
    method.guidance.control = AffineControl(0.0, 0.0)
    assert method.residual(x, t).abs().mean() > 0.1


@pytest.mark.slow
@pytest.mark.usefixtures("float64_default")
def test_e7b_escorted_works_along_the_sampler():
    """E7(b): NETS' escorted works ``A`` along the sampler's own paths (the base's reverse SDE, eps = g^2/2, guided by
    NETS' drift), against the closed form ``log Z = B^2 S2 / 2``. At the exact correction ``A`` is the same on every
    path (std 0) and its error is the left-point rule's ``O(1/K)`` (K = 50 -> 200 divides it by ~4); with no
    correction and with a wrong one, Jarzynski's ``log mean e^A`` is unbiased (up to that bias) and ``E[A] < log Z``.
    This checks that the drift the sampler runs is the one the work assumes, which the residual test cannot."""
    log_z = 0.5 * B ** 2 * S2
    errors = {}
    for n_steps in (50, 200):
        torch.manual_seed(0)
        method = _nets_1d(ExactControl(), n_steps)
        traj = method.sampler.sample(method.base, method.guidance, 2000, keep_states=True)
        works = method.escorted_works(traj.states)
        assert works.std() < 1e-10
        errors[n_steps] = log_z - works.mean().item()
        # the exact correction transports pi_t: the samples follow the tilt N(B S2, S2)
        assert abs(traj.x0.mean().item() - B * S2) < 4 * math.sqrt(S2 / 2000)
    assert 0 < errors[200] < 0.005 and 3.5 < errors[50] / errors[200] < 4.5, errors
    for a, c in ((0.0, 0.0), (0.2, 0.2)):
        torch.manual_seed(1)
        method = _nets_1d(AffineControl(a, c), 200)
        n = 8000
        traj = method.sampler.sample(method.base, method.guidance, n, keep_states=True)
        works = method.escorted_works(traj.states)
        w = (works - works.max()).exp()
        se = (w.std() / w.mean()).item() / math.sqrt(n)  # delta method: s.e. of log mean e^A
        estimate = (torch.logsumexp(works, 0) - math.log(n)).item()
        assert abs(estimate - log_z) < 4 * se + 0.005, (a, c, estimate, log_z, se)
        assert works.mean().item() < log_z - 0.05
        if a == c == 0:  # without the correction the samples are not the tilt: the weights do the work
            assert abs(traj.x0.mean().item() - B * S2) > 0.1


@pytest.mark.usefixtures("float64_default")
def test_nets_own_log_z_estimates_at_the_exact_transport():
    """``NETS.log_z_estimates`` (what the evaluators report for NETS beside the path works' estimates) at the exact
    correction and free energy of the 1-D problem: ``log_z_nets = F(0)`` is the closed form ``B^2 S2 / 2``; the escorted
    estimate is within the left-point rule's bias (0.0114 at K = 50, E7(b)) with every path's work equal (ESS 1);
    ``own_log_z_metrics`` adds each estimate's error against a given exact value; 0 paths or a method without an
    estimator of its own give none."""
    from iif.methods.base import Method
    from iif.metrics.log_z import own_log_z_metrics

    log_z = 0.5 * B ** 2 * S2
    method = _nets_1d(ExactControl(), 50)
    method.guidance.free_energy = lambda t: 0.5 * (1 - t) ** 2 * B ** 2 * _var(t)
    torch.manual_seed(0)
    own = own_log_z_metrics(method, 300, log_z)
    assert set(own) == {"log_z_nets", "log_z_escorted", "escorted_ess_frac", "log_z_error_nets",
                        "log_z_error_escorted"}
    assert own["log_z_nets"] == pytest.approx(log_z, abs=1e-12)
    assert own["log_z_error_nets"] == pytest.approx(0, abs=1e-12)
    assert 0.005 < log_z - own["log_z_escorted"] < 0.02 and own["escorted_ess_frac"] == pytest.approx(1.0)
    assert own["log_z_error_escorted"] == pytest.approx(own["log_z_escorted"] - log_z)
    assert own_log_z_metrics(method, 0, log_z) == {}
    assert Method.log_z_estimates(method, 300) == {}  # the default: no estimator of its own


class SOCPath:
    """The SOC path of the 1-D problem, ``r_t = log h_t`` with ``h_t(x) = E[e^{B X_0} | X_t = x]``: ``X_0 | x ~ N(alpha
    S2 x / V, S2 sigma^2 / V)``, so ``log h_t = B alpha S2 x / V + B^2 S2 sigma^2 / (2 V)`` (test-local)."""

    @staticmethod
    def log_h(x, t):
        a, s, v = VP.alpha(t)[:, None], VP.sigma(t)[:, None], _var(t)[:, None]
        return (B * a * S2 * x / v + B ** 2 * S2 * s ** 2 / (2 * v))[:, 0]

    def rate(self, x, t, cond=None):  # d_tau = -d_t
        with torch.enable_grad():
            tt = t.detach().double().requires_grad_(True)
            (d_t,) = torch.autograd.grad(self.log_h(x.detach().double(), tt).sum(), tt)
        return -d_t.to(x.dtype)

    def grad(self, x, t, cond=None):
        return (B * VP.alpha(t.double()) * S2 / _var(t.double())).to(x.dtype)[:, None].expand_as(x)


class HalfGradLogH(nn.Module):
    """``u = c / g^2`` for ``c = (g^2 / 2) grad log h_t``, i.e. ``c = (sigma / 2) u*`` with ``u* = g grad log h`` the
    SOC-optimal control (test-local)."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()))

    def forward(self, x, t, x0_hat, cond=None):
        return 0.5 * SOCPath().grad(x, t)


@pytest.mark.usefixtures("float64_default")
def test_e7c_nets_on_the_soc_path_is_the_optimal_control():
    """E7(c): on the SOC path ``r_t = log h_t`` the marginals are the tilt's noised ones, ``Z_t = Z`` at every t, and
    the exact NETS correction is ``(sigma / 2) u*`` (``g^2 / 2 grad log h``): the residual vanishes at every (x, t)
    with ``F = log Z`` constant. Sampled with it, NETS' SDE is the base's reverse SDE guided by ``grad log h``, the
    optimal h-transform: its samples follow the tilt ``N(B S2, S2)`` and the escorted works are 0 on every path (the
    path's two ends have the same Z)."""
    method = _nets_1d(HalfGradLogH(), n_steps=200)
    method.guidance.path = SOCPath()
    method.guidance.free_energy = lambda t: 0 * t + B ** 2 * S2 / 2  # log Z_t = log Z
    torch.manual_seed(0)
    t = 0.02 + 0.96 * torch.rand(256)
    x = 3 * torch.randn(256, 1)
    torch.testing.assert_close(method.residual(x, t), torch.zeros(256), rtol=0, atol=1e-8)
    method.guidance.control = AffineControl(0.0, 0.0)  # the path's own drift alone does not transport it
    assert method.residual(x, t).abs().mean() > 0.1
    method.guidance.control = HalfGradLogH()
    n = 4000
    traj = method.sampler.sample(method.base, method.guidance, n, keep_states=True)
    works = method.escorted_works(traj.states)
    assert works.abs().max() < 1e-8
    assert abs(traj.x0.mean().item() - B * S2) < 4 * math.sqrt(S2 / n) + 0.01  # + the 200-step chain's bias
    assert abs(traj.x0.var().item() - S2) < 0.05


SIZES = {"csm": ["method.n_samples=1024", "method.n_keep=512", "method.grad_steps=60", "method.batch_size=512"],
         "nsm": ["method.n_samples=1024", "method.n_keep=512", "method.grad_steps=60", "method.batch_size=512"],
         "as": ["method.n_samples=256", "method.grad_steps=60", "method.batch_size=512"],
         "iif": ["method.n_samples=1024", "method.grad_steps=60", "method.batch_size=512", "buffer.prefill=1024",
                 "method.score_target._target_=iif.score_targets.Mixed"],
         "cmcd": ["method.batch_size=128", "method.grad_steps=10"],
         "nets": ["method.batch_size=128", "method.grad_steps=10", "method.loss_steps=8"],
         # path (B): the untrained chain (AIS, K = 100) is at energy distance 0.26 and a reward-KL gap of 2.3
         "cmcd_annealing": ["method.batch_size=64", "method.chain.n_steps=25", "method.optimizer.lr=5e-3"],
         "nets_annealing": ["method.batch_size=64", "method.chain.n_steps=25", "method.optimizer.lr=5e-3"]}


LOG_Z_SAMPLE_GAUSSIAN = math.log(2 * math.pi) - 0.5 * math.log(2.0 * 1.0 - 0.8 * 0.8)  # conf/reward/gaussian_energy.yaml


@pytest.mark.slow
@pytest.mark.parametrize("method", list(SIZES))
def test_sampling_methods_reach_the_gaussian_target(method, tmp_path):
    """Each method on experiment=sample_gaussian (base N(0, 4I), target N(m, P^-1), exact log Z) in a few seconds:
    the untrained base is at energy distance ~0.59 and BAR error ~0.015 with a reward-KL gap of 4.1."""
    cfg, choices = compose(["experiment=sample_gaussian", f"method={method}", "logger=none", "iterations=8",
                            "sampler.n_steps=50", "evaluation.n_samples=4000", "evaluation.n_reverse=2000",
                            "torch_threads=1", *SIZES[method]])
    out = train(cfg, tmp_path, choices)
    assert out["energy_distance"] < 0.02, out
    assert abs(out["log_z_error_bar"]) < 0.05, out
    if method.startswith("nets"):  # the PINN's free energy estimates log Z; its sampler is not yet close in path KL
        logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
        first, last = logged[0], logged[-1]
        assert abs(last["log_z_nets"] - LOG_Z_SAMPLE_GAUSSIAN) < 0.1, last
        assert last["loss"] < 0.1 * first["loss"], (first, last)  # E7(d): the PINN loss falls (4.9 -> 0.14 here)
        # the final evaluation reports them as errors against the exact log Z
        assert out["log_z_nets"] - out["log_z_error_nets"] == pytest.approx(LOG_Z_SAMPLE_GAUSSIAN)
        assert abs(out["log_z_error_nets"]) < 0.1, out
        if method == "nets":  # E7(d): the escorted works' ESS -> 1 (0.69 -> 0.98 here), their estimate -> log Z
            assert last["escorted_ess_frac"] > 0.9 and first["escorted_ess_frac"] < last["escorted_ess_frac"], last
            assert abs(last["log_z_escorted"] - LOG_Z_SAMPLE_GAUSSIAN) < 0.1, last
            assert out["escorted_ess_frac"] > 0.9 and abs(out["log_z_error_escorted"]) < 0.1, out
    else:
        assert out["kl_gap"] < 0.3, out
        assert "log_z_error_nets" not in out and "log_z_error_escorted" not in out, out


class LinearReward2D(Reward):
    """``r(x) = b . x`` (test-local)."""

    def __init__(self, b):
        super().__init__()
        self.b = torch.tensor(b)

    def evaluate(self, x, cond=None):
        return x @ self.b.to(x)


def test_e7a_reward_annealing_works_identities():
    """E7(a): path (B) from the Gaussian base ``N(mu, Sigma)`` to its tilt by ``r = b . x``, ``gamma_lambda ∝
    N(mu + lambda Sigma b, Sigma)``, ``log Z = b . mu + b . Sigma b / 2`` (closed form). In discrete time, for any
    drift, Jarzynski's forward and Crooks' reverse estimates (reverse paths from exact target samples) are unbiased;
    AIS (``c = 0``) and a wrong drift within a few standard errors; the exact drift ``c = Sigma b`` transports the
    path, so the works nearly collapse onto log Z (std ``O(delta)``); NETS' residual is zero at it with ``F = log
    Z_lambda``, and not at ``c = 0``."""
    from iif.samplers.annealing import RewardAnnealing

    mu, sigma = torch.tensor([0.5, -0.3]), torch.tensor([[1.0, 0.3], [0.3, 0.6]])
    b = torch.tensor([0.8, -0.5])
    base = GMMExact(GMM([1.0], [mu.tolist()], [sigma.tolist()]), VPSchedule())
    reward = LinearReward2D(b.tolist())
    log_z = float(b @ mu + 0.5 * b @ sigma @ b)
    chain = RewardAnnealing(n_steps=50, horizon=1.0)
    exact = lambda x, s: (sigma @ b).to(x).expand_as(x)  # noqa: E731
    wrong = lambda x, s: -0.5 * x  # noqa: E731
    target = torch.distributions.MultivariateNormal(mu + sigma @ b, sigma)
    torch.manual_seed(0)
    stds = {}
    for name, drift in {"ais": None, "exact": exact, "wrong": wrong}.items():
        _, w_f, _ = chain.forward(base, reward, drift, 20_000)
        w_r = chain.backward(base, reward, drift, target.sample((20_000,)))
        se_f = (w_f - log_z).exp().std().item() / math.sqrt(len(w_f))  # s.e. of the mean of e^{W - log Z}
        se_r = (log_z - w_r).exp().std().item() / math.sqrt(len(w_r))
        assert abs(jarzynski(w_f) - log_z) < 4 * se_f + 1e-3, (name, jarzynski(w_f), log_z)
        assert abs(crooks(w_r) - log_z) < 4 * se_r + 1e-3, (name, crooks(w_r), log_z)
        assert w_f.mean() <= log_z <= w_r.mean() + 1e-3  # the sandwich
        stds[name] = w_f.std().item()
    assert stds["exact"] < 0.05 < stds["ais"] / 3, stds
    # NETS' residual of path (B) at the exact transport with F(s) = log Z_{lambda(s)}
    x, s = torch.randn(64, 2), torch.rand(64)
    f_dot = b @ mu + s * (b @ sigma @ b)  # d log Z_lambda / dt with lambda = t (H = 1, p = 1)
    r_exact = chain.residual(base, reward, x, s, (sigma @ b).expand(64, 2), torch.zeros(64), f_dot)
    r_ais = chain.residual(base, reward, x, s, torch.zeros(64, 2), torch.zeros(64), f_dot)
    assert r_exact.abs().max() < 1e-5 and r_ais.abs().mean() > 0.1
    with pytest.raises(ValueError, match="closed form"):  # a learned base has no density: refused before compute
        RewardAnnealing.check(torch.nn.Module())


def _nu_reference(tau: float, noise_ratio: float, nu_1: float = 1.0) -> float:
    """``int_0^tau sigma_B(s)^2 ds`` by the trapezoid rule on 20001 points: constant ``sigma_B^2 = nu_1``, or adjoint
    sampling's ``sigma_B(s) = sigma_min rho^(1 - s) sqrt(2 log rho)`` with ``sigma_min^2 = nu_1 / (rho^2 - 1)``."""
    s = torch.linspace(0, tau, 20001, dtype=torch.float64)
    if noise_ratio == 1:
        return nu_1 * tau
    rho = torch.tensor(noise_ratio, dtype=torch.float64)
    sigma_sq = nu_1 / (rho ** 2 - 1) * rho ** (2 * (1 - s)) * 2 * torch.log(rho)
    return torch.trapezoid(sigma_sq, s).item()


def test_geometric_brownian_bridge_coefficients():
    """The geometric schedule's path (``BrownianBridge(nu_1, noise_ratio)``) against adjoint sampling's formula: ``nu``
    against the quadrature of ``sigma_B^2``, ``g^2`` against ``sigma_B(1 - t)^2`` and against the generic
    ``d sigma^2/dt - 2 sigma^2 d log alpha/dt`` (autograd), ``(alpha', sigma')`` against autograd; ``rho -> 1`` tends to
    the constant schedule; a ratio below 1 is refused."""
    from iif.schedules.brownian import BrownianBridge

    nu_1, rho = 2.0, 30.0
    path = BrownianBridge(nu_1, rho)
    t = torch.tensor([0.0, 0.05, 0.3, 0.5, 0.8, 0.97, 1.0], dtype=torch.float64)
    nu_ref = torch.tensor([_nu_reference(1 - v, rho, nu_1) for v in t.tolist()], dtype=torch.float64)
    torch.testing.assert_close(path.nu(t), nu_ref, rtol=1e-7, atol=1e-9)
    sigma_min_sq = nu_1 / (rho ** 2 - 1)
    torch.testing.assert_close(path.diffusion_sq(t), sigma_min_sq * rho ** (2 * t) * 2 * math.log(rho))
    tt = t[1:-1].clone().requires_grad_(True)
    alpha, sigma = path.alpha(tt), path.sigma(tt)
    d_alpha = torch.autograd.grad(alpha.sum(), tt, retain_graph=True)[0]
    d_sigma = torch.autograd.grad(sigma.sum(), tt, retain_graph=True)[0]
    d_sigma_sq = torch.autograd.grad((sigma ** 2).sum(), tt, retain_graph=True)[0]
    d_log_alpha = torch.autograd.grad(alpha.log().sum(), tt)[0]
    torch.testing.assert_close(path.diffusion_sq(t[1:-1]), (d_sigma_sq - 2 * sigma ** 2 * d_log_alpha).detach())
    got_alpha, got_sigma = path.d_alpha_sigma(t[1:-1])
    torch.testing.assert_close(got_alpha, d_alpha)
    torch.testing.assert_close(got_sigma, d_sigma)
    near = BrownianBridge(nu_1, 1 + 1e-6)
    constant = BrownianBridge(nu_1)
    for name in ("alpha", "sigma", "diffusion_sq"):
        torch.testing.assert_close(getattr(near, name)(t), getattr(constant, name)(t), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="noise_ratio"):
        BrownianBridge(nu_1, 0.5)


@pytest.mark.parametrize("noise_ratio", [1.0, 50.0])
def test_brownian_base_chain_bridge_and_exact_works(noise_ratio):
    """The Brownian base with a point start (``base_model=brownian``, ``sampler=brownian``), constant and geometric
    ``sigma_B``: the unguided chain is Brownian motion from 0 (per-coordinate variance ``nu_tau = int_0^tau sigma_B^2``
    at every step, by quadrature); the noising path from a fixed ``x_0`` is the Brownian bridge
    ``N(nu_tau / nu_1 x_0, nu_tau (nu_1 - nu_tau) / nu_1)`` (§9.4); the base's noise prediction equals the Gaussian
    mixture formula on the same path; and with a non-trivial guidance the path works, started at the point (no prior
    density), still give the exact log Z both ways."""
    from iif.base_models.brownian import BrownianBase
    from iif.samplers.brownian import BrownianSampler

    torch.manual_seed(0)
    prior = GMM.isotropic([[0.0, 0.0]], var=1.0)
    base, sampler = BrownianBase(prior, noise_ratio), BrownianSampler(20)
    reward = EnergyReward(QuadraticEnergy(M.tolist(), P.tolist()), prior)
    states = sampler.sample(base, None, 20_000, keep_states=True).states  # x_N = 0, ..., x_0
    assert states[0].abs().max() == 0
    for i in (5, 10, 20):  # tau = i / 20
        torch.testing.assert_close(states[i].var(0), torch.full((2,), _nu_reference(i / 20, noise_ratio)), rtol=0.05,
                                   atol=0)
    nu = _nu_reference(0.5, noise_ratio)
    x0 = torch.tensor([1.5, -0.5]).expand(20_000, 2)
    bridge = sampler.noising_path(base, x0)[0][10]  # tau = 1/2
    torch.testing.assert_close(bridge.mean(0), nu * x0[0], rtol=0, atol=0.02)
    torch.testing.assert_close(bridge.var(0), torch.full((2,), nu * (1 - nu)), rtol=0.05, atol=0)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    x = torch.randn(3, 2)
    torch.testing.assert_close(base.eps(x, t), GMMExact(prior, base.schedule).eps(x, t), rtol=1e-5, atol=1e-6)
    guide = Affine()
    method = _Fixed(base, reward, sampler, guide)
    log_gamma = lambda x: -reward.energy(x.double())  # noqa: E731
    w_f = forward_works(sampler.sample(base, guide, 40_000), log_gamma)
    w_r = reverse_works(method, torch.distributions.MultivariateNormal(M, precision_matrix=P).sample((40_000,)),
                        log_gamma)
    assert w_f.std() > 0.3
    assert abs(jarzynski(w_f) - LOG_Z) < 0.03 and abs(crooks(w_r) - LOG_Z) < 0.03
    assert abs(bar(w_f, w_r) - LOG_Z) < 0.02 and w_f.mean() < LOG_Z < w_r.mean()
    with pytest.raises(ValueError, match="sampler=brownian"):
        FlowSDESampler(10).kernels(base)
    # the guidance is in score units: the exact h* = grad log p*_t - grad log p_t (closed form, evaluated just after
    # the point start, where the difference is finite) samples the Gaussian target, within the 50 steps' O(dt) error
    from iif.guidance.oracle import ExactTiltGuidance
    oracle = ExactTiltGuidance(prior, GMM([1.0], [M.tolist()], [torch.linalg.inv(P).tolist()]), base.schedule)
    h_star = lambda x, t, x0_hat, cond=None: oracle(x, t.clamp(max=1 - 1e-4), x0_hat)  # noqa: E731
    x = BrownianSampler(50).sample(base, h_star, 20_000).x0.double()
    torch.testing.assert_close(x.mean(0), M, rtol=0, atol=0.03)
    torch.testing.assert_close(torch.cov(x.T), torch.linalg.inv(P), rtol=0, atol=0.05)


@pytest.mark.slow
@pytest.mark.parametrize("noise_ratio", [1, 20])
def test_adjoint_sampling_on_the_brownian_base(tmp_path, noise_ratio):
    """Adjoint sampling in its own setting: the Brownian base from 0 (constant and geometric ``sigma_B``), where the
    lean adjoint is constant along the path (every transport matrix is the identity), reaches the 2-D Gaussian target
    in 8 iterations."""
    from iif.build import build

    overrides = ["experiment=sample_gaussian", "base_model=brownian", "sampler=brownian", "method=as", "logger=none",
                 "iterations=8", "evaluation.n_samples=4000", "evaluation.n_reverse=2000", "torch_threads=1",
                 f"base_model.noise_ratio={noise_ratio}"]
    cfg, choices = compose(overrides)
    transport = build(cfg).method._transport
    torch.testing.assert_close(transport, torch.eye(2).expand_as(transport))
    out = train(cfg, tmp_path, choices)
    assert out["energy_distance"] < 0.02 and abs(out["log_z_error_bar"]) < 0.05 and out["kl_gap"] < 0.3, out
