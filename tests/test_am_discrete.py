"""Adjoint matching's regression target on the discrete chain, against the closed form of a Gaussian base with a
linear reward (docs/methods.md §7.4, §U9.1).

Gaussian data ``N(mu, s^2 I)``, the exact base (``GMMExact``, one component), the DDPM chain on the VP path and
``r(x) = <b, x>`` with temperature ``lambda``. Every base mean is affine, ``mu^0_k(x) = A_k x + m_k``, written out
here from the VP formulas (not from the code's kernels):

    alphabar_k = m(k/N)^2,  alpha_k = alphabar_k / alphabar_{k-1},  beta_k = 1 - alpha_k,
    v_k = alphabar_k s^2 + 1 - alphabar_k                                    (variance of the noised data)
    eps(x, t_k) = sqrt(1 - alphabar_k) (x - sqrt(alphabar_k) mu) / v_k       (exact noise prediction)
    A_k = (1 - beta_k / v_k) / sqrt(alpha_k),  m_k = beta_k sqrt(alphabar_k) mu / (v_k sqrt(alpha_k)).

Then every ``V_{k-1}(x) = E^0[e^{r(x_0)/lambda} | x_{k-1} = x]`` is exp-linear with slope ``G_k b / lambda``,
``G_k = A_1 ... A_{k-1}`` (empty product 1), so the tilted path measure's kernels are Gaussian with the base variance
``c_k^2 = beta_k`` and the state-independent mean shift

    Delta*_k = c_k^2 G_k b / lambda.

The lean adjoint is ``a_{k-1} = -G_k b / lambda`` on every path, so the post-step target ``-c_k^2 a_{k-1}`` is
``Delta*_k`` and the pre-step target ``-c_k^2 a_k = A_k Delta*_k`` carries one extra Jacobian.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from iif.base_models.gmm_exact import GMMExact
from iif.gmm import GMM
from iif.methods.am import AdjointMatching
from iif.rewards.base import Reward
from iif.rewards.gmm import GMMReward
from iif.samplers.ddpm import DDPMSampler
from iif.schedules.vp import VPSchedule
from tests.conftest import gaussian_ddpm_chain

MU, S2, B, LAM = (0.5, -1.0), 0.3, (1.0, -0.5), 0.5
BETA_MIN, BETA_MAX = 0.1, 20.0


class LinearReward(Reward):
    """``r(x) = <b, x>`` with the closed-form gradient ``b``."""

    def __init__(self, b, temperature: float):
        super().__init__(temperature=temperature)
        self.b = torch.as_tensor(b, dtype=torch.float64)

    def evaluate(self, x, cond=None):
        return x @ self.b.to(x.dtype)

    def _grad(self, x, cond=None):
        return self.b.to(x.dtype).expand_as(x).clone()


class StepShift(nn.Module):
    """``h(x, t) = theta_k`` for the step ``k = round(t N)`` (state-independent)."""

    def __init__(self, theta: torch.Tensor):
        super().__init__()
        self.n_steps = theta.shape[0] - 1
        self.theta = nn.Parameter(theta.clone())

    def forward(self, x, t, x0_hat, cond=None):
        return self.theta[torch.round(t * self.n_steps).long()].to(x.dtype)


def closed_form(n: int) -> dict:
    """The chain's coefficients (index ``k = 1..N``; index 0 unused), the optimal shifts ``Delta*_k [N+1, D]``, and
    the moments of the base chain's ``x_0``: ``m_chain`` and the per-coordinate variance ``v_chain``."""
    b = torch.tensor(B, dtype=torch.float64)
    c = gaussian_ddpm_chain(n, MU, S2, BETA_MIN, BETA_MAX)
    alpha, beta, slope, offset = c["alpha"], c["beta"], c["slope"], c["offset"]
    g = [None] + [math.prod(slope[1:k]) for k in range(1, n + 2)]  # g[k] = A_1 ... A_{k-1}
    delta = torch.zeros(n + 1, 2, dtype=torch.float64)
    for k in range(1, n + 1):
        delta[k] = beta[k] * g[k] * b / LAM
    mean, var = torch.zeros(2, dtype=torch.float64), 1.0  # x_N ~ N(0, I), then x_{k-1} = A_k x_k + m_k + c_k z
    for k in range(n, 0, -1):
        mean, var = slope[k] * mean + offset[k], slope[k] ** 2 * var + beta[k]
    shift_coef = [0.0] + [beta[k] / math.sqrt(alpha[k]) for k in range(1, n + 1)]
    return dict(slope=slope, beta=beta, shift_coef=shift_coef, delta=delta, m_chain=mean, v_chain=var, b=b,
                mu=torch.tensor(MU, dtype=torch.float64))


def problem(n: int, target: str, loss_steps: int | None = None):
    base = GMMExact(GMM.isotropic(torch.tensor([MU]), torch.ones(1), var=S2), VPSchedule(BETA_MIN, BETA_MAX))
    sampler, reward = DDPMSampler(n), LinearReward(B, LAM)
    cf = closed_form(n)
    theta = torch.zeros(n + 1, 2, dtype=torch.float64)
    for k in range(1, n + 1):
        theta[k] = cf["delta"][k] / cf["shift_coef"][k]  # Delta*_k / k_h: the optimal h in score units
    guid = StepShift(theta)
    am = AdjointMatching(base, reward, sampler, guid, batch_size=8, loss_steps=loss_steps or n, target=target,
                         clip_quantile=1.0)
    return am, cf


def target_shift(am: AdjointMatching, traj) -> torch.Tensor:
    """``[N, b, D]``: the shift each step is regressed onto, ``-c_k^2 a`` (the loss's zero)."""
    var = torch.tensor([k.var for k in am.sampler.kernels(am.base)], dtype=torch.float64)
    return -var[:, None, None] * am.regressed_adjoint(am.lean_adjoint(traj))


@pytest.mark.parametrize("n", [10, 100])
def test_post_step_target_is_the_optimal_discrete_shift(float64_default, n):
    """(a) The post-step target equals ``Delta*_k`` on every path and step, on paths of the base chain and of the
    optimal chain (the adjoint of this problem does not depend on the path)."""
    am, cf = problem(n, "post")
    expected = cf["delta"].flip(0)[:-1]  # row i is the step k = N - i
    for guidance in (None, am.guidance):
        torch.manual_seed(0)
        traj = am.sampler.sample(am.base, guidance, 64, keep_states=True)
        got = target_shift(am, traj)
        rel = (got - expected[:, None]).norm(dim=-1) / expected[:, None].norm(dim=-1)
        assert rel.max() < 1e-10, rel.max()


@pytest.mark.parametrize("n, ratio", [(10, 0.39), (100, 0.905)])
def test_pre_step_target_carries_one_extra_jacobian(float64_default, n, ratio):
    """(b) The pre-step target is ``A_k Delta*_k`` at every step: at the noisiest step ``A_N`` is about 0.39 for
    ``N = 10`` and 0.905 for ``N = 100`` (``A_N ~ sqrt(alpha_N)`` since ``alphabar_N ~ 0``)."""
    am, cf = problem(n, "pre")
    torch.manual_seed(0)
    traj = am.sampler.sample(am.base, None, 64, keep_states=True)
    got = target_shift(am, traj)
    slope = torch.tensor(cf["slope"][1:], dtype=torch.float64).flip(0)  # row i: A_{N-i}
    expected = slope[:, None, None] * cf["delta"].flip(0)[:-1, None]
    rel = (got - expected).norm(dim=-1) / expected.norm(dim=-1)
    assert rel.max() < 1e-10, rel.max()
    measured = got[0].norm(dim=-1) / cf["delta"][n].norm()  # noisiest step: pre target / optimal shift
    assert torch.allclose(measured, torch.full_like(measured, cf["slope"][n]), rtol=1e-10)
    assert cf["slope"][n] == pytest.approx(ratio, abs=5e-3)


@pytest.mark.parametrize("n", [10, 100])
def test_loss_gradient_vanishes_at_the_optimum_only_post_step(float64_default, n):
    """(c) With ``h`` the closed-form optimum, the post-step AM loss has zero gradient in ``h`` (every term is 0:
    about 1e-17 here); the pre-step loss has a non-zero gradient at every step (its minimiser is ``A_k Delta*_k``;
    the mean over ``N`` steps makes it small per step at ``N = 100``, 4e-7 to 4e-5)."""
    grads = {}
    for target in ("post", "pre"):
        am, _ = problem(n, target)
        torch.manual_seed(0)
        traj = am.sampler.sample(am.base, am.guidance, 256, keep_states=True)
        loss, kept = am.loss(traj, am.lean_adjoint(traj))
        grads[target] = torch.autograd.grad(loss, am.guidance.theta)[0][1:]
        assert kept == 1.0
    assert grads["post"].abs().max() < 1e-9, grads["post"].abs().max()
    assert (grads["pre"].abs().amax(-1) > 1e-8).all() and grads["pre"].abs().max() > 1e-5, grads["pre"]


@pytest.mark.parametrize("n", [10, 100])
def test_optimal_shift_samples_the_tilt_of_the_chain(float64_default, n):
    """(d) Independent check that ``Delta*`` is the optimum: the chain guided by it has the mean of the tilted path
    measure's ``x_0``, ``E^0[x_0 e^{r/lambda}] / E^0[e^{r/lambda}]``, estimated by self-normalised importance weights
    on base-chain samples (no closed form), and equal in closed form to ``m_chain + v_chain b / lambda``, the tilt
    of the base chain's own ``x_0`` law ``N(m_chain, v_chain I)`` (up to ``G_{N+1}^2 b / lambda < 1e-5``, the
    untilted start ``x_N ~ N(0, I)``). The base chain's ``v_chain`` is not the data's ``s^2``
    (0.3955 for ``N = 10``, 0.3087 for ``N = 100``, against 0.3: the DDPM chain with variance ``beta_k`` is not
    exact in discrete time), so the data tilt ``mu + s^2 b / lambda`` is not the chain's optimum; at ``N = 10``
    the difference is far outside the noise. The pre-step fixed point ``A_k Delta*_k`` misses the tilt (power)."""
    am, cf = problem(n, "post")
    count = 50_000
    unit = cf["b"] / cf["b"].norm()  # the tilt moves the mean along b: test the projection on it for power
    torch.manual_seed(1)
    guided = am.sampler.sample(am.base, am.guidance, count).x0
    mean, se = guided.mean(0), guided.std(0) / math.sqrt(count)
    se_b = (unit ** 2 * se ** 2).sum().sqrt()

    base = am.sampler.sample(am.base, None, count).x0
    w = torch.softmax(base @ cf["b"] / LAM, 0)
    snis = (w[:, None] * base).sum(0)
    snis_se = ((w[:, None] ** 2) * (base - snis) ** 2).sum(0).sqrt()
    assert ((mean - snis).abs() <= 4 * (se ** 2 + snis_se ** 2).sqrt()).all(), (mean, snis, se, snis_se)

    tilt_chain = cf["m_chain"] + cf["v_chain"] * cf["b"] / LAM
    assert ((mean - tilt_chain).abs() <= 4 * se).all(), (mean, tilt_chain, se)
    tilt_data = cf["mu"] + S2 * cf["b"] / LAM
    if n == 10:  # (v_chain - s^2) |b| / lambda = 0.21 here
        assert ((mean - tilt_data) @ unit).abs() > 20 * se_b, (mean, tilt_data, se_b)

    with torch.no_grad():  # the pre-step fixed point: h_k = A_k Delta*_k / k_h
        for k in range(1, n + 1):
            am.guidance.theta[k] *= cf["slope"][k]
    torch.manual_seed(1)
    pre = am.sampler.sample(am.base, am.guidance, count).x0.mean(0)
    assert ((pre - tilt_chain) @ unit).abs() > 8 * se_b, (pre, tilt_chain, se_b)  # 0.032 = 13 s.e. at N = 100


@pytest.mark.parametrize("target", ["post", "pre"])
def test_loss_vanishes_when_the_shift_is_the_regressed_target(float64_default, target):
    """On the toy (GMM prior and reward, non-linear adjoint), the loss is ``mean ||Delta_k / c_k + c_k a||^2`` over
    the sampled steps with ``a`` the row that ``target`` picks (``a_{k-1}``: post, ``a_k``: pre): with
    ``h = -sqrt(alpha_k) a`` (so ``Delta_k = -beta_k a``) at each sampled step it is 0, and with the other row it is
    not. The loss draws its steps; the same seed reproduces the draw here (row ``i`` is the step ``k = N - i``)."""
    n, b = 10, 4
    torch.manual_seed(0)
    prior = GMM.grid([-2.0, 0.0, 2.0], var=0.1, dim=2)
    reward = GMMReward(means=[[2.0, 2.0], [-2.0, 0.0]], weights=[0.7, 0.3], var=0.5)
    base, sampler = GMMExact(prior, VPSchedule(BETA_MIN, BETA_MAX)), DDPMSampler(n)
    am = AdjointMatching(base, reward, sampler, StepShift(torch.zeros(n + 1, 2)), batch_size=b, loss_steps=n,
                         target=target, clip_quantile=1.0)
    traj = sampler.sample(base, None, b, keep_states=True)
    a = am.lean_adjoint(traj)
    assert a.shape == (n + 1, b, 2)

    class Given(nn.Module):
        def forward(self, x, t, x0_hat, cond=None):
            return self.h

    am.guidance = Given()
    m = lambda t: math.exp(-0.25 * t ** 2 * (BETA_MAX - BETA_MIN) - 0.5 * t * BETA_MIN)  # noqa: E731
    alpha = torch.tensor([1.0] + [(m(k / n) / m((k - 1) / n)) ** 2 for k in range(1, n + 1)])
    torch.manual_seed(3)
    idx = torch.rand(b, n).argsort(dim=1)
    cols = torch.arange(b)[:, None].expand_as(idx)
    losses = {}
    for row, name in ((idx + 1, "post"), (idx, "pre")):
        am.guidance.h = -alpha[n - idx.reshape(-1)].sqrt()[:, None] * a[row, cols].reshape(b * n, 2)
        torch.manual_seed(3)
        losses[name] = am.loss(traj, a)[0].item()
    other = "pre" if target == "post" else "post"
    assert losses[target] < 1e-20 and losses[other] > 1e-3, losses


def test_gradient_accumulation_steps_on_the_mean_gradient_of_its_batches(float64_default):
    """``accumulate = 2``: one optimiser step (plain SGD, lr 1) moves ``h`` by minus the mean of the two batches'
    loss gradients, each batch drawn, adjoined and regressed as a step of its own (same random stream)."""
    am, _ = problem(10, "pre", loss_steps=4)
    am = AdjointMatching(am.base, am.reward, am.sampler, am.guidance, batch_size=8, grad_steps=1, accumulate=2,
                         loss_steps=4, clip_quantile=1.0, optimizer=lambda p: torch.optim.SGD(p, lr=1.0))
    with torch.no_grad():
        am.guidance.theta.add_(0.3)  # away from the optimum: non-zero gradients
    theta0 = am.guidance.theta.detach().clone()
    torch.manual_seed(0)
    grads = []
    for _ in range(2):
        traj = am.sampler.sample(am.base, am.guidance, 8, keep_states=True)
        loss, _ = am.loss(traj, am.lean_adjoint(traj))
        grads.append(torch.autograd.grad(loss, am.guidance.theta)[0])
    torch.manual_seed(0)
    am.fit_step(0)
    torch.testing.assert_close(am.guidance.theta.detach(), theta0 - (grads[0] + grads[1]) / 2)
    assert not torch.allclose(grads[0], grads[1])
