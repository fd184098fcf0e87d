"""Energies with a known log Z (iif/energies/) and the reward that turns sampling into tilting
(iif/rewards/energy.py), each checked against an independent float64 reference: log Z by brute-force trapezoid
grids or importance sampling, gradients by autograd, samples by their moments, mode fractions and a KS bound
against the density. Seeds are fixed; every statistical tolerance is stated with its n and standard error."""
from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate

from iif.config import compose
from iif.energies.double_well import DoubleWellEnergy
from iif.energies.gaussian import QuadraticEnergy
from iif.energies.gmm import GMMEnergy
from iif.gmm import GMM
from iif.rewards.energy import EnergyReward

F64 = torch.float64
NORMAL = torch.distributions.Normal(torch.tensor(0.0, dtype=F64), torch.tensor(1.0, dtype=F64))

# the values of conf/reward/*_energy.yaml and double_well.yaml
GRID_MEANS = [[x, y] for x in (-4.0, 0.0, 4.0) for y in (-4.0, 0.0, 4.0)]
GRID_WEIGHTS = [0.02, 0.04, 0.06, 0.08, 0.10, 0.12, 0.14, 0.20, 0.24]
GAUSS_MEAN, GAUSS_PREC = [1.0, -0.5], [[2.0, 0.8], [0.8, 1.0]]


def grid_gmm() -> GMMEnergy:
    return GMMEnergy(GRID_MEANS, GRID_WEIGHTS, var=0.3, log_z=1.5)


def far_gmm() -> GMMEnergy:
    return GMMEnergy.far_modes(dim=10, n_modes=4, distance=8.0, var=1.0, log_z=-2.5)


def gaussian() -> QuadraticEnergy:
    return QuadraticEnergy(GAUSS_MEAN, GAUSS_PREC)


ENERGIES = {"grid_gmm": grid_gmm, "far_gmm": far_gmm, "gaussian": gaussian,
            "double_well": lambda: DoubleWellEnergy(dim=3, a=1.0, b=-6.0, c=1.0)}


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def log_trapezoid_2d(energy, lo, hi, h) -> float:
    """``log int int exp(-E)`` by the trapezoid rule on a square-cell grid over the box ``lo``..``hi`` (2-D)."""
    axes = [torch.arange(lo[i], hi[i] + h / 2, h, dtype=F64) for i in range(2)]
    xx, yy = torch.meshgrid(*axes, indexing="ij")
    e = energy(torch.stack([xx.ravel(), yy.ravel()], 1)).reshape(xx.shape)
    e_min = e.min()
    inner = torch.trapezoid(torch.trapezoid(torch.exp(-(e - e_min)), axes[1], dim=1), axes[0])
    return (torch.log(inner) - e_min).item()


def simpson(f: torch.Tensor, h: float) -> torch.Tensor:
    """Simpson's rule for samples ``f`` at spacing ``h`` (an even number of intervals)."""
    assert (f.numel() - 1) % 2 == 0
    w = torch.ones_like(f)
    w[1:-1:2], w[2:-1:2] = 4.0, 2.0
    return h / 3 * (w * f).sum()


def assert_fractions(counts: torch.Tensor, probs: torch.Tensor, slack: torch.Tensor | float = 0.0):
    """Every empirical fraction within 4 binomial standard errors ``sqrt(p (1 - p) / n)`` (+ ``slack``) of ``p``."""
    n = counts.sum()
    se = torch.sqrt(probs * (1 - probs) / n)
    assert ((counts / n - probs).abs() <= 4 * se + slack).all(), (counts / n, probs, se)


def voronoi_slack(e: GMMEnergy) -> torch.Tensor:
    """Bound on |nearest-mean cell mass - w_k|: sum_j (w_j + w_k) Phi(-|mu_j - mu_k| / 2 sd) (union bound)."""
    d = torch.cdist(e.modes, e.modes)
    phi = NORMAL.cdf(-d / (2 * math.sqrt(e.gmm._iso_var[0].item())))
    phi.fill_diagonal_(0.0)
    return ((e.mode_weights[None] + e.mode_weights[:, None]) * phi).sum(1)


# ----------------------------------------------------------------------------- log Z against brute force
def test_gmm_energy_is_the_mixture_minus_log_z():
    """E(x) = -log sum_k w_k N(x; mu_k, var I) - log_z, the mixture from torch.distributions."""
    e = grid_gmm()
    mix = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(probs=torch.tensor(GRID_WEIGHTS, dtype=F64)),
        torch.distributions.Independent(torch.distributions.Normal(
            torch.tensor(GRID_MEANS, dtype=F64), math.sqrt(0.3) * torch.ones(9, 2, dtype=F64)), 1))
    x = 6 * torch.rand(100, 2, dtype=F64, generator=generator(0)) - 3
    torch.testing.assert_close(e(x), -mix.log_prob(x) - 1.5, rtol=1e-12, atol=1e-12)


def test_gmm_log_z_by_trapezoid_grid():
    """2-D, 9 modes (sd 0.55): trapezoid with h = 0.05 on [-9, 9]^2 (mode means >= 9 sd inside; error ~1e-13)."""
    e = grid_gmm()
    assert abs(log_trapezoid_2d(e, (-9, -9), (9, 9), 0.05) - e.log_z) < 1e-8
    assert e.log_z == 1.5


def test_far_modes_log_z_by_importance_sampling():
    """10-D: n = 1e5 from q = equal mixture of N(mu_k, 1.5 I), log Z_hat = log mean(exp(-E) / q); SE =
    std(w) / (mean(w) sqrt n) ~ 3e-3. Also the layout: pairwise distance 8, weights 0.1..0.4."""
    e = far_gmm()
    assert e.dim == 10 and e.modes.shape == (4, 10)
    d = torch.cdist(e.modes, e.modes)
    torch.testing.assert_close(d[~torch.eye(4, dtype=torch.bool)], torch.full((12,), 8.0, dtype=F64))
    torch.testing.assert_close(e.mode_weights, torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64))
    n, g = 100_000, generator(1)
    comp = torch.randint(0, 4, (n,), generator=g)
    x = e.modes[comp] + math.sqrt(1.5) * torch.randn(n, 10, dtype=F64, generator=g)
    log_q = torch.logsumexp(NORMAL.log_prob((x[:, None] - e.modes[None]) / math.sqrt(1.5)).sum(-1), 1) \
        - 10 * 0.5 * math.log(1.5) - math.log(4)
    log_w = -e(x) - log_q
    w = torch.exp(log_w - log_w.max())
    log_z_hat = (torch.log(w.mean()) + log_w.max()).item()
    se = (w.std() / (w.mean() * math.sqrt(n))).item()
    assert abs(log_z_hat - e.log_z) < 4 * se, (log_z_hat, e.log_z, se)


def test_quadratic_log_z_by_trapezoid_grid():
    """2-D, correlated (conf/reward/gaussian_energy.yaml): trapezoid h = 0.05 on m +- 10 (covariance sd <= 1.22)."""
    e = gaussian()
    m = GAUSS_MEAN
    assert abs(log_trapezoid_2d(e, (m[0] - 10, m[1] - 10), (m[0] + 10, m[1] + 10), 0.05) - e.log_z) < 1e-8


def test_quadratic_log_z_in_4d_by_importance_sampling():
    """4-D random SPD P (eigenvalues 0.5..12): n = 1e5 from q = torch's MultivariateNormal(m, 1.5 P^-1),
    log Z_hat = log mean(exp(-E) / q), within 4 SE = 4 std(w) / (mean(w) sqrt n) (SE ~2e-3)."""
    g = generator(2)
    a = torch.randn(4, 4, dtype=F64, generator=g)
    prec = a @ a.T + 0.5 * torch.eye(4, dtype=F64)
    mean = torch.randn(4, dtype=F64, generator=g)
    e = QuadraticEnergy(mean.tolist(), prec.tolist())
    q = torch.distributions.MultivariateNormal(mean, precision_matrix=prec / 1.5)
    n = 100_000
    x = mean + torch.randn(n, 4, dtype=F64, generator=g) @ q.scale_tril.T  # q.sample without the global RNG
    w = torch.exp(-e(x) - q.log_prob(x))
    se = (w.std() / (w.mean() * math.sqrt(n))).item()
    assert abs(torch.log(w.mean()).item() - e.log_z) < 4 * se, (torch.log(w.mean()).item(), e.log_z, se)


def test_quadratic_precision_forms():
    """A scalar and a diagonal list mean scalar * I and diag(list); log Z = D/2 log 2pi - 1/2 sum log p_i."""
    x = torch.randn(7, 3, dtype=F64, generator=generator(3))
    full = QuadraticEnergy([0.0, 1.0, 2.0], torch.diag(torch.tensor([2.0, 3.0, 4.0], dtype=F64)).tolist())
    diag = QuadraticEnergy([0.0, 1.0, 2.0], [2.0, 3.0, 4.0])
    torch.testing.assert_close(diag(x), full(x))
    assert abs(diag.log_z - (1.5 * math.log(2 * math.pi) - 0.5 * math.log(24.0))) < 1e-12
    scalar = QuadraticEnergy([0.0, 1.0, 2.0], 2.0)
    torch.testing.assert_close(scalar(x), (x - torch.tensor([0.0, 1.0, 2.0], dtype=F64)).pow(2).sum(-1))


@pytest.mark.parametrize("a,b,c", [(1.0, -6.0, 1.0), (0.5, -2.0, -0.7)])
def test_double_well_log_z_and_mode_weights_by_trapezoid_grid(a, b, c):
    """2-D: trapezoid h = 0.005 in x_1 on [-4, 4] (E_1 >= 100 above its minimum at +-4), h = 0.05 in x_2 on
    [-9, 9]; the mode weights by Simpson's rule (h = 0.005, error O(h^4)) for exp(-E_1) on [-4, 0] and [0, 4] (the
    trapezoid's O(h^2) error at the cut x_1 = 0, ~1e-6, would show)."""
    e = DoubleWellEnergy(dim=2, a=a, b=b, c=c)
    x1 = torch.arange(-4.0, 4.0 + 1e-9, 0.005, dtype=F64)
    x2 = torch.arange(-9.0, 9.0 + 1e-9, 0.05, dtype=F64)
    xx, yy = torch.meshgrid(x1, x2, indexing="ij")
    dens = torch.exp(-e(torch.stack([xx.ravel(), yy.ravel()], 1)).reshape(xx.shape))
    assert abs(math.log(torch.trapezoid(torch.trapezoid(dens, x2, dim=1), x1).item()) - e.log_z) < 1e-8
    e1 = torch.exp(-(a * x1 ** 4 + b * x1 ** 2 + c * x1))
    halves = torch.stack([simpson(e1[x1 <= 1e-9], 0.005), simpson(e1[x1 >= -1e-9], 0.005)])
    torch.testing.assert_close(e.mode_weights, halves / halves.sum(), rtol=1e-8, atol=1e-10)
    # the modes: the minimiser of E on each half-line (the wells)
    for k, side in enumerate((x1 <= 0, x1 >= 0)):
        e_side = torch.where(side, -torch.log(e1), torch.inf)
        assert abs(e.modes[k, 0].item() - x1[e_side.argmin()].item()) < 0.005
    assert e.modes[0, 0] < 0 <= e.modes[1, 0]


def test_double_well_in_more_dimensions_adds_standard_normals():
    """log Z(D = 4) - log Z(D = 2) = 2 log int exp(-t^2 / 2) dt (trapezoid on [-12, 12])."""
    t = torch.linspace(-12, 12, 4801, dtype=F64)
    one = math.log(torch.trapezoid(torch.exp(-t ** 2 / 2), t).item())
    assert abs(DoubleWellEnergy(dim=4).log_z - DoubleWellEnergy(dim=2).log_z - 2 * one) < 1e-10


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("name", ENERGIES)
def test_grad_is_autograd_of_the_energy(name):
    e = ENERGIES[name]()
    x = 3 * torch.randn(64, e.dim, dtype=F64, generator=generator(4))
    x.requires_grad_(True)
    (auto,) = torch.autograd.grad(e(x).sum(), x)
    torch.testing.assert_close(e.grad(x.detach()), auto, rtol=1e-10, atol=1e-10)
    x32 = x.detach().float()
    assert e(x32).dtype == torch.float32 and e.grad(x32).dtype == torch.float32 and e(x32).shape == (64,)


# ----------------------------------------------------------------------------- exact samples
def test_grid_gmm_samples_mode_fractions():
    """n = 2e4: each nearest-mean fraction within 4 SE (<= 0.012) of w_k, plus the cell-overlap bound (~1e-4)."""
    e = grid_gmm()
    x = e.sample(20_000, generator(5))
    assert x.shape == (20_000, 2) and x.dtype == F64
    assert_fractions(torch.bincount(e.mode_of(x), minlength=9).double(), e.mode_weights, voronoi_slack(e))


def test_far_gmm_samples_mode_fractions_and_spread():
    """n = 2e4 in 10-D: mode fractions within 4 SE (+ overlap bound ~1e-4); per-mode spread var 1 (SE 3e-3)."""
    e = far_gmm()
    x = e.sample(20_000, generator(6))
    modes = e.mode_of(x)
    assert_fractions(torch.bincount(modes, minlength=4).double(), e.mode_weights, voronoi_slack(e))
    resid = x - e.modes[modes]
    assert abs(resid.var().item() - 1.0) < 4 * math.sqrt(2 / resid.numel())


def test_gaussian_samples_mean_and_covariance():
    """n = 2e4 of N(m, P^-1): each mean within 4 SE sqrt(S_ii / n); each covariance entry within 4 SE
    sqrt((S_ii S_jj + S_ij^2) / n) (<= 0.06)."""
    e = gaussian()
    n = 20_000
    x = e.sample(n, generator(7))
    cov = torch.linalg.inv(torch.tensor(GAUSS_PREC, dtype=F64))
    se_mean = torch.sqrt(torch.diagonal(cov) / n)
    assert ((x.mean(0) - torch.tensor(GAUSS_MEAN, dtype=F64)).abs() < 4 * se_mean).all()
    se_cov = torch.sqrt((torch.diagonal(cov)[:, None] * torch.diagonal(cov)[None] + cov ** 2) / n)
    assert ((torch.cov(x.T) - cov).abs() < 4 * se_cov).all(), (torch.cov(x.T), cov)
    assert e.modes is None and e.mode_weights is None
    with pytest.raises(NotImplementedError):
        e.mode_of(x)


def double_well_ks(e: DoubleWellEnergy, x1: torch.Tensor, lo: float, hi: float) -> float:
    """sup_t |F_n(t) - F(t)| with F the CDF of exp(-E_1) / Z_1 by cumulative trapezoid on [lo, hi], h = 1e-3."""
    t = torch.arange(lo, hi + 1e-9, 1e-3, dtype=F64)
    dens = torch.exp(-(e.a * t ** 4 + e.b * t ** 2 + e.c * t))
    cdf = torch.cat([torch.zeros(1, dtype=F64), torch.cumulative_trapezoid(dens, t)])
    cdf = cdf / cdf[-1]
    emp = torch.searchsorted(torch.sort(x1).values, t, right=True).double() / x1.numel()
    return (emp - cdf).abs().max().item()


def test_double_well_samples_against_the_density():
    """n = 1e5: x_1's KS distance to the quadrature CDF below the DKW bound sqrt(log(2 / alpha) / 2n) = 0.0085
    (alpha = 1e-6); mode fractions within 4 SE (SE 5.6e-4 for the light mode); x_2, x_3 standard normal (SE 3e-3)."""
    e = DoubleWellEnergy(dim=3)
    n = 100_000
    x = e.sample(n, generator(8))
    assert x.shape == (n, 3) and x.dtype == F64
    assert double_well_ks(e, x[:, 0], -4.0, 4.0) < math.sqrt(math.log(2 / 1e-6) / (2 * n))
    assert_fractions(torch.bincount(e.mode_of(x), minlength=2).double(), e.mode_weights)
    rest = x[:, 1:]
    assert (rest.mean(0).abs() < 4 / math.sqrt(n)).all()
    assert ((rest.var(0) - 1).abs() < 4 * math.sqrt(2 / n)).all()
    torch.testing.assert_close(e.sample(100, generator(9)), e.sample(100, generator(9)), rtol=0, atol=0)


def test_double_well_sampler_tails_are_exact():
    """With a tail gap of 1 the envelope's exponential tails beyond +-L are drawn often (> 2% of samples); the
    samples still follow exp(-E_1) / Z_1: KS below the DKW bound (n = 5e4, alpha = 1e-6: 0.012)."""
    class ShortWindow(DoubleWellEnergy):
        TAIL_GAP = 1.0

    e = ShortWindow(dim=1, a=0.5, b=-2.0, c=-0.7)
    n = 50_000
    x1 = e.sample(n, generator(10))[:, 0]
    assert (x1.abs() > e.L).double().mean() > 0.02
    assert double_well_ks(e, x1, -5.0, 5.0) < math.sqrt(math.log(2 / 1e-6) / (2 * n))


# ----------------------------------------------------------------------------- the energy reward
def wide_base(dim: int) -> GMM:
    return GMM.isotropic(torch.zeros(1, dim, dtype=F64), var=4.0)


def mixture_base(dim: int) -> GMM:
    means = torch.randn(5, dim, dtype=F64, generator=generator(11))
    return GMM.isotropic(means, torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), var=0.7)


@pytest.mark.parametrize("name", ENERGIES)
def test_reward_tilts_the_base_into_the_energy(name):
    """log p_base(x) + r(x) == -E(x) pointwise, with a mixture base; x's dtype in and out."""
    e = ENERGIES[name]()
    base = mixture_base(e.dim)
    reward = EnergyReward(e, base)
    assert reward.energy is e and reward.base is base
    x = 4 * torch.randn(256, e.dim, dtype=F64, generator=generator(12))
    torch.testing.assert_close(base.log_prob(x) + reward(x), -e(x), rtol=1e-12, atol=1e-9)
    assert reward(x.float()).dtype == torch.float32 and reward.grad_log_tilt(x.float()).dtype == torch.float32


def test_reward_expectation_under_the_base_is_z():
    """Gaussian energy, base N(0, 4 I) (wider than P^-1: bounded weights): log mean_{x ~ p_base} exp r(x) vs log Z,
    n = 2e4, within 4 SE = 4 std(w) / (mean(w) sqrt n) (SE ~ 0.006)."""
    e = gaussian()
    base = wide_base(2)
    reward = EnergyReward(e, base)
    n = 20_000
    w = torch.exp(reward(base.sample(n, generator(13))))
    se = (w.std() / (w.mean() * math.sqrt(n))).item()
    assert abs(torch.log(w.mean()).item() - e.log_z) < 4 * se, (torch.log(w.mean()).item(), e.log_z, se)


@pytest.mark.parametrize("name", ENERGIES)
def test_reward_grad_is_autograd(name):
    """The closed-form -grad E - grad log p_base against autograd of r; grad_log_tilt divides by lambda."""
    e = ENERGIES[name]()
    reward = EnergyReward(e, mixture_base(e.dim), temperature=2.0)
    x = 3 * torch.randn(64, e.dim, dtype=F64, generator=generator(14))
    x.requires_grad_(True)
    (auto,) = torch.autograd.grad(reward.evaluate(x).sum(), x)
    torch.testing.assert_close(reward._grad(x.detach()), auto, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(reward.grad_log_tilt(x.detach()), auto / 2, rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------- errors
def test_bad_arguments_name_the_config_key():
    with pytest.raises(ValueError, match="dimension 10 but the base distribution"):
        EnergyReward(far_gmm(), wide_base(2))
    with pytest.raises(ValueError, match=r"reward\.energy\.var must be > 0"):
        GMMEnergy([[0.0, 0.0]], var=0.0)
    with pytest.raises(ValueError, match=r"reward\.energy\.weights"):
        GMMEnergy([[0.0, 0.0], [1.0, 1.0]], weights=[1.0, -1.0])
    with pytest.raises(ValueError, match=r"reward\.energy\.n_modes"):
        GMMEnergy.far_modes(dim=2, n_modes=3)
    with pytest.raises(ValueError, match=r"reward\.energy\.precision must be positive definite"):
        QuadraticEnergy([0.0, 0.0], [[1.0, 2.0], [2.0, 1.0]])
    with pytest.raises(ValueError, match=r"reward\.energy\.precision must be symmetric"):
        QuadraticEnergy([0.0, 0.0], [[1.0, 0.5], [0.0, 1.0]])
    with pytest.raises(ValueError, match=r"reward\.energy\.precision must be a scalar"):
        QuadraticEnergy([0.0, 0.0], [[1.0, 0.0, 0.0]] * 3)
    with pytest.raises(ValueError, match=r"reward\.energy\.a must be > 0"):
        DoubleWellEnergy(a=0.0)
    with pytest.raises(ValueError, match=r"reward\.energy\.dim"):
        DoubleWellEnergy(dim=0)


# ----------------------------------------------------------------------------- the configs
WIDE_PRIOR = "+prior={{_target_:iif.gmm.GMM.isotropic,means:[[{zeros}]],var:4.0}}"


@pytest.mark.parametrize("option,energy_type,dim,log_z", [
    ("gmm_energy", GMMEnergy, 2, 1.5),
    ("gmm10d_energy", GMMEnergy, 10, -2.5),
    ("gaussian_energy", QuadraticEnergy, 2, math.log(2 * math.pi) - 0.5 * math.log(2.0 * 1.0 - 0.8 ** 2)),
    ("double_well", DoubleWellEnergy, 2, None),
])
def test_energy_reward_configs_compose_and_instantiate(option, energy_type, dim, log_z):
    """reward=<option> with a `dim`-D prior N(0, 4 I) (the toy2d experiment's own 2-D grid prior for the 2-D ones,
    too): the reward builds with the prior as its base, and r is finite on the prior's samples."""
    zeros = ",".join(["0.0"] * dim)
    priors = [["~prior", WIDE_PRIOR.format(zeros=zeros)]] + ([[]] if dim == 2 else [])
    for prior in priors:
        cfg, choices = compose([f"reward={option}", *prior])
        assert choices["reward"] == option
        reward = instantiate(cfg.reward)
        assert isinstance(reward, EnergyReward) and isinstance(reward.energy, energy_type)
        assert isinstance(reward.base, GMM) and reward.base.dim == reward.energy.dim == dim
        assert reward.name == option and reward.temperature == 1.0
        if log_z is not None:
            assert abs(reward.energy.log_z - log_z) < 1e-12
        assert torch.isfinite(reward(reward.base.sample(256, generator(15)))).all()
