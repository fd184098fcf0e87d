"""The online fine-tuning baselines (pathwise, VarGrad, DPOK, adjoint matching) against independent references:
torch.distributions for DPOK's per-step log-probabilities, autograd through the base chain for AM's lean adjoint,
the closed-form KL gradient of a Gaussian base with a linear reward for VarGrad, and the spec's loss written out
with a full graph for VarGrad's step-wise gradient accumulation."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import kill_fit_step_at
from iif.base_models.gmm_exact import GMMExact
from iif.gmm import GMM
from iif.methods.am import AdjointMatching
from iif.methods.dpok import DPOK, gaussian_log_prob
from iif.methods.vargrad import VarGrad
from iif.rewards.base import Reward
from iif.rewards.gmm import GMMReward
from iif.samplers.ddpm import DDPMSampler
from iif.schedules.vp import VPSchedule
from iif.config import compose
from iif.train import train

FAST = ["debug=fast", "logger=none", "base_model=gmm_exact"]


class LinearReward(Reward):
    """``r(x) = <b, x>`` (test-local, so the closed forms below do not use the suite's reward code)."""

    def __init__(self, b):
        super().__init__()
        self.b = torch.as_tensor(b, dtype=torch.float32)

    def evaluate(self, x, cond=None):
        return x @ self.b.to(x.dtype)


class StepwiseConstant(nn.Module):
    """``h(x, t) = theta_k`` for the step ``k = round(t N)``: state-independent, so every path law is Gaussian."""

    def __init__(self, n_steps: int, dim: int):
        super().__init__()
        self.n_steps = n_steps
        self.theta = nn.Parameter(0.5 * torch.randn(n_steps + 1, dim))

    def forward(self, x, t, x0_hat, cond=None):
        return self.theta[torch.round(t * self.n_steps).long()]


def _toy(n_steps=10, seed=0):
    torch.manual_seed(seed)
    prior = GMM.grid([-2.0, 0.0, 2.0], var=0.1, dim=2)
    reward = GMMReward(means=[[2.0, 2.0], [-2.0, 0.0]], weights=[0.7, 0.3], var=0.5)
    base = GMMExact(prior, VPSchedule())
    return prior, reward, base, DDPMSampler(n_steps)


def _ddpm(n: int) -> dict[str, torch.Tensor]:
    """The DDPM coefficients of the default VP path on the grid ``t_k = k/N``, computed here (index ``k = 0..N``):
    ``alphabar_k = m(t_k)^2``, ``alpha_k = alphabar_k / alphabar_{k-1}``, ``beta_k = 1 - alpha_k``."""
    t = torch.arange(n + 1, dtype=torch.float64) / n
    alphabar = VPSchedule().m(t) ** 2
    alpha = torch.ones_like(alphabar)
    alpha[1:] = alphabar[1:] / alphabar[:-1]
    return {"t": t, "alphabar": alphabar, "alpha": alpha, "beta": 1 - alpha}


def _guidance(base, reward):
    from iif.guidance.reward_informed import RewardInformedGuidance
    g = RewardInformedGuidance(base, reward, hidden=32, layers=2)
    with torch.no_grad():  # non-zero h, so that the guided and base chains differ
        for p in g.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return g


# ---------------------------------------------------------------------------------------------- DPOK
def test_dpok_log_prob_equals_torch_distributions():
    torch.manual_seed(0)
    x, mean, sigma = torch.randn(64, 3), torch.randn(64, 3), torch.rand(64) + 0.1
    ref = torch.distributions.Normal(mean, sigma[:, None]).log_prob(x).mean(-1)
    assert torch.allclose(gaussian_log_prob(x, mean, sigma), ref, atol=1e-5)


def test_dpok_old_log_probs_are_the_sampling_kernels():
    """The stored ``log p_old`` of each transition equals ``Normal(mu^0 + Delta, sqrt(beta))`` of the guided kernel,
    recomputed here from the base model and the guidance at the stored states with the schedule written out."""
    prior, reward, base, sampler = _toy()
    guid = _guidance(base, reward)
    dpok = DPOK(base, reward, sampler, guid, n_samples=32, transitions=10_000, batch_size=16, value_batch_size=16)
    traj = sampler.sample(base, guid, 32, keep_states=True)
    rows = dpok._pack(traj, reward.log_tilt(traj.x0))
    x, _, _, x_prev, k, log_p_old, r = dpok._unpack(rows)
    n = sampler.n_steps
    t = k.double() / n
    abar = VPSchedule().m(t) ** 2
    abar_prev = VPSchedule().m(t - 1.0 / n) ** 2
    alpha = abar / abar_prev
    beta = 1 - alpha
    with torch.no_grad():
        eps = base.eps(x, t.float())
        mu0 = (x.double() - (beta / (1 - abar).sqrt())[:, None] * eps.double()) / alpha.sqrt()[:, None]
        h = guid(x, t.float(), base.x0_hat(x, t.float(), eps)).double()
    mean = mu0 + (beta / alpha.sqrt())[:, None] * h
    ref = torch.distributions.Normal(mean, beta.sqrt()[:, None]).log_prob(x_prev.double()).mean(-1)
    assert torch.allclose(log_p_old.double(), ref, atol=2e-4)
    assert torch.allclose(r, reward.log_tilt(traj.x0).repeat(n))


def test_dpok_micro_batches_take_the_step_of_the_whole_batch():
    """Gradient accumulation over chunks of 4 transitions moves the policy as one pass over the batch of 16 does
    (same transitions: the same random stream), and a chunk size that does not divide the batch too."""
    prior, reward, base, sampler = _toy()
    params = []
    for micro in (None, 4, 5):
        torch.manual_seed(3)
        guid = _guidance(base, reward)
        dpok = DPOK(base, reward, sampler, guid, n_samples=8, transitions=1000, batch_size=16, value_batch_size=16,
                    grad_steps=2, value_steps=1, micro_batch_size=micro,
                    optimizer=lambda p: torch.optim.SGD(p, lr=1.0))
        before = [p.detach().clone() for p in guid.parameters()]
        dpok.fit_step(0)
        params.append([p.detach() - b for p, b in zip(guid.parameters(), before)])
    assert max(d.abs().max() for d in params[0]) > 1e-4  # the step moved the policy
    for other in params[1:]:
        for a, b in zip(params[0], other):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)  # float32 sums in another order


def test_dpok_value_network_sees_the_condition():
    """On class-conditional images (``experiment=tiny_image``, two classes): the value's first layer takes the
    state, the label's one-hot and the time embedding; changing only the label changes the value; an iteration fits
    the value on the stored transitions' labels."""
    from iif.build import build

    cfg, _ = compose(["experiment=tiny_image", "conditions.classes=[3,5]", "method=dpok", "debug=fast",
                      "logger=none", "sampler.n_steps=4", "method.n_samples=4", "method.transitions=64",
                      "method.batch_size=8", "method.grad_steps=1", "method.value_steps=1",
                      "method.value_batch_size=8", "method.value_hidden=16", "torch_threads=1"])
    torch.manual_seed(0)
    dpok = build(cfg).method
    d, f = 1 * 8 * 8, 2
    assert dpok.value.body[0].in_features == d + f + dpok.value.t_dim
    x, t = torch.randn(4, d), torch.rand(4)
    v3, v5 = dpok.value_of(x, t, torch.full((4,), 3)), dpok.value_of(x, t, torch.full((4,), 5))
    assert v3.shape == (4,) and (v3 - v5).abs().min() > 1e-6  # a fresh TimeMLP has non-zero weights
    row = dpok.fit_step(0)
    assert math.isfinite(row["value_loss"]) and row["transitions"] == 4 * 4


# ---------------------------------------------------------------------------------------------- AM
def test_am_lean_adjoint_equals_autograd_through_the_base_chain():
    """docs/methods.md §U8 E3: ``a_t = -d r(x_0) / d x_t`` through the deterministic part of the base chain,
    ``x_{s-1} = mu^0_s(x_s) + c_s`` with the offsets ``c_s`` (guidance shift + noise) frozen at their sampled values."""
    prior, reward, base, sampler = _toy(n_steps=12)
    guid = _guidance(base, reward)
    am = AdjointMatching(base, reward, sampler, guid, batch_size=8, loss_steps=4)
    traj = sampler.sample(base, guid, 8, keep_states=True)
    a = am.lean_adjoint(traj)
    n = sampler.n_steps
    sched = _ddpm(n)
    offsets = traj.states[1:] - traj.base_means  # c_s = Delta_s + sigma_s z_s
    assert a.shape[0] == n + 1  # the states x_N, ..., x_0 (the last row: a_0 = -grad r(x_0)/lambda)
    for i in (0, 5, n - 1, n):
        x = traj.states[i].clone().double().requires_grad_(True)
        y = x
        for j in range(i, n):
            k = n - j
            t = torch.full((8,), k / n)
            eps = base.eps(y, t.float()).double()
            alpha, beta, abar = sched["alpha"][k], sched["beta"][k], sched["alphabar"][k]
            y = (y - beta / (1 - abar).sqrt() * eps) / alpha.sqrt() + offsets[j].double()
        (g,) = torch.autograd.grad(-reward.gmm.log_prob(y).sum(), x)
        assert torch.allclose(a[i].double(), g, rtol=1e-3, atol=1e-5), i


@pytest.mark.parametrize("target", ["post", "pre"])
def test_am_loss_is_zero_when_the_shift_equals_the_regressed_adjoint(target):
    """The zero of the AM loss (not the optimum: for ``pre`` it is not, tests/test_am_discrete.py): with
    ``h = -sqrt(alpha) a`` the AM loss terms vanish: ``Delta/sigma + sigma a = 0`` (loss of the spec's
    ``||sqrt(dt) u + std a||^2`` written with ``Delta = beta/sqrt(alpha) h``), ``a`` the adjoint the step is regressed
    on: at the state after the step (``post``, lean-adjoint row ``i + 1``) or before it (``pre``, row ``i``)."""
    prior, reward, base, sampler = _toy(n_steps=10)

    class FromAdjoint(nn.Module):
        def forward(self, x, t, x0_hat, cond=None):
            return self.h

    guid = FromAdjoint()
    am = AdjointMatching(base, reward, sampler, _guidance(base, reward), batch_size=4, loss_steps=10, clip_quantile=1.0,
                         target=target)
    traj = sampler.sample(base, None, 4, keep_states=True)
    a = am.lean_adjoint(traj)  # rows: the states x_N, ..., x_0
    assert a.shape == (11, 4, 2)
    am.guidance = guid
    # the loss evaluates h at S = N steps per trajectory in a random order; feed each its own -sqrt(alpha) a
    # (loss index i is the step k = N - i, from the state row i to the state row i + 1)
    torch.manual_seed(3)
    idx = torch.rand(4, 10).argsort(dim=1)
    cols = torch.arange(4)[:, None].expand_as(idx)
    alpha = _ddpm(10)["alpha"].float()
    rows = idx + 1 if target == "post" else idx
    guid.h = (-alpha[10 - idx.reshape(-1)].sqrt()[:, None] * a[rows, cols].reshape(40, 2))
    torch.manual_seed(3)
    loss, kept = am.loss(traj, a)
    assert loss.item() < 1e-10 and kept == 1.0


# ---------------------------------------------------------------------------------------------- VarGrad
def test_vargrad_stepwise_gradient_equals_autograd_of_the_variance():
    """The step-at-a-time accumulation equals autograd of ``var(ell)`` with ``ell`` built over the whole
    trajectory as in [IIF 59] (discrete form of docs/methods.md §7.2)."""
    prior, reward, base, sampler = _toy(n_steps=8)
    guid = _guidance(base, reward)
    vg = VarGrad(base, reward, sampler, guid, batch_size=64)
    traj = sampler.sample(base, guid, 64, keep_states=True)
    log_r = reward.log_tilt(traj.x0).double()
    vg.trainer.zero_grad()
    vg.accumulate_gradient(traj, -traj.log_rnd - log_r)
    got = [p.grad.clone() for p in guid.parameters()]

    sched = _ddpm(8)
    ell = -log_r
    for i, k in enumerate(range(8, 0, -1)):
        x, x_next, z = traj.states[i], traj.states[i + 1], traj.noises[i]
        alpha, beta = float(sched["alpha"][k]), float(sched["beta"][k])
        delta = beta / math.sqrt(alpha) * guid(x, torch.full((64,), k / 8), traj.x0_hats[i])
        sg = delta.detach()
        ell = ell + ((delta * sg).sum(1) / beta - (delta ** 2).sum(1) / (2 * beta)
                     + (delta * z).sum(1) / math.sqrt(beta))
    assert torch.allclose(ell.detach(), -traj.log_rnd - log_r, atol=1e-4)  # ell at v = h is -log RND - r
    ref = torch.autograd.grad(ell.var(), list(guid.parameters()))
    for g, r in zip(got, ref):
        assert torch.allclose(g, r.float(), rtol=1e-4, atol=1e-6)


def test_vargrad_gradient_is_twice_the_kl_gradient_gaussian_linear():
    """Gaussian base ``N(mu, s^2 I)``, linear reward ``<b, x>``, state-independent ``h = theta_k``: the chain is
    linear-Gaussian, ``KL(P^h||P^tilt) = sum_k ||Delta_k||^2 / (2 beta_k) - <b, E_h x_0> + log Z`` with
    ``E_h x_0 = E_0 x_0 + sum_k G_k Delta_k``, ``G_k`` the product of the base-mean slopes of the later steps
    (docs/methods.md §U9.1). The VarGrad gradient at ``v = h`` must be twice its gradient."""
    torch.manual_seed(0)
    n, mu, s2 = 6, torch.tensor([0.5, -1.0]), 0.3
    prior = GMM.isotropic(mu[None], torch.ones(1), var=s2)
    sched = VPSchedule()
    base = GMMExact(prior, sched)
    sampler = DDPMSampler(n)
    b = torch.tensor([1.0, -0.5])
    reward = LinearReward(b)
    guid = StepwiseConstant(n, 2)
    vg = VarGrad(base, reward, sampler, guid, batch_size=2)

    disc = _ddpm(n)
    slope = {k: (1 - float(disc["beta"][k]) / (float(disc["alphabar"][k]) * s2 + 1 - float(disc["alphabar"][k])))
             / math.sqrt(float(disc["alpha"][k])) for k in range(1, n + 1)}  # d mu^0_k / dx for the Gaussian base
    expected = torch.zeros(n + 1, 2, dtype=torch.float64)
    for k in range(1, n + 1):
        c = float(disc["beta"][k]) / math.sqrt(float(disc["alpha"][k]))
        g_k = math.prod(slope[j] for j in range(1, k))  # x_0 depends on Delta_k through steps k-1..1
        delta = c * guid.theta[k].detach().double()
        expected[k] = c * (delta / float(disc["beta"][k]) - g_k * b.double())

    grads = []
    for _ in range(20):  # 20 x 20k trajectories
        traj = sampler.sample(base, guid, 20_000, keep_states=True)
        ell = -traj.log_rnd - reward.log_tilt(traj.x0).double()
        vg.trainer.zero_grad()
        vg.accumulate_gradient(traj, ell)
        grads.append(guid.theta.grad.double().clone())
    g = torch.stack(grads)
    mean, se = g.mean(0), g.std(0) / math.sqrt(len(grads))
    err = (mean[1:] - 2 * expected[1:]).abs()
    assert (err <= 4 * se[1:] + 1e-3).all(), (mean[1:], 2 * expected[1:], se[1:])
    assert (2 * expected[1:]).abs().max() > 20 * se[1:].max()  # the test has power


# ---------------------------------------------------------------------------------------------- pathwise
def test_pathwise_gradient_matches_finite_differences_of_the_sc_loss(float64_default):
    """The reparametrised gradient of ``mean(control_cost - r/lambda)`` through ``rsample`` (graph through every step,
    the base in x, the reward-informed features, the counted reward backward) equals central finite differences
    of the same loss evaluated by the no-grad sampler with common random numbers, along a random direction
    (float64, so the comparison is not limited by round-off)."""
    prior, reward, base, sampler = _toy(n_steps=10)
    guid = _guidance(base, reward)
    params = list(guid.parameters())

    def loss(differentiable: bool):
        torch.manual_seed(7)
        if differentiable:
            traj = sampler.rsample(base, guid, 64)
            return (traj.control_cost - reward.log_tilt_autograd(traj.x0)).mean()
        traj = sampler.sample(base, guid, 64)
        return (traj.control_cost - reward.log_tilt(traj.x0)).mean().item()

    grad_evals = reward.grad_evals
    grads = torch.autograd.grad(loss(True), params)
    assert reward.grad_evals - grad_evals >= 64  # the backward through r(x_0) was counted
    direction = [torch.randn_like(p) for p in params]
    analytic = sum((g * d).sum() for g, d in zip(grads, direction)).item()
    h = 1e-6  # the perturbed h makes the loss strongly curved: the truncation error needs a small step
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.add_(h * d)
        plus = loss(False)
        for p, d in zip(params, direction):
            p.sub_(2 * h * d)
        minus = loss(False)
        for p, d in zip(params, direction):
            p.add_(h * d)
    assert abs(analytic) > 1e-2
    assert (plus - minus) / (2 * h) == pytest.approx(analytic, rel=1e-5)


def _gaussian_linear(n: int, b=(1.0, -0.5), s2: float = 0.3):
    """Gaussian base ``N(mu, s^2 I)`` on an ``n``-step chain, linear reward ``<b, x>``, and the closed forms of
    docs/methods.md §U9.1 for a state-independent ``h = theta_k``: the base-mean slopes give ``G_k`` (how
    ``x_0`` moves with the shift ``Delta_k``), ``dKL/dtheta_k = c_k (Delta_k / beta_k - G_k b)`` with
    ``c_k = beta_k / sqrt(alpha_k)``, the optimum ``theta*_k = sqrt(alpha_k) G_k b`` (the tilted path measure given
    ``x_N``), and ``G_{N+1}``, the slope of ``E[x_0 | x_N]``, so that
    ``log E[e^r | x_N] = <b, G_{N+1} x_N> + const``."""
    mu = torch.tensor([0.5, -1.0])
    sched = VPSchedule()
    base = GMMExact(GMM.isotropic(mu[None], torch.ones(1), var=s2), sched)
    b = torch.tensor(b)
    disc = _ddpm(n)
    beta = {k: float(disc["beta"][k]) for k in range(1, n + 1)}
    alpha = {k: float(disc["alpha"][k]) for k in range(1, n + 1)}
    slope = {k: (1 - beta[k] / (float(disc["alphabar"][k]) * s2 + 1 - float(disc["alphabar"][k]))) / math.sqrt(alpha[k])
             for k in range(1, n + 1)}
    g = {k: math.prod(slope[j] for j in range(1, k)) for k in range(1, n + 2)}

    def kl_grad(theta):
        out = torch.zeros(n + 1, 2, dtype=torch.float64)
        for k in range(1, n + 1):
            c = beta[k] / math.sqrt(alpha[k])
            out[k] = c * (c * theta[k].double() / beta[k] - g[k] * b.double())
        return out

    optimum = torch.zeros(n + 1, 2)
    for k in range(1, n + 1):
        optimum[k] = math.sqrt(alpha[k]) * g[k] * b
    return base, DDPMSampler(n), LinearReward(b), kl_grad, optimum, g[n + 1]


def test_stl_log_ratio_is_minus_the_log_rnd(float64_default):
    """``rsample(stl=True)`` returns ``log dP^h/dP^0`` of each path: in value, ``-log_rnd`` of the same run, and the
    control cost plus the zero-mean cross term; without ``stl`` it is not computed."""
    prior, reward, base, sampler = _toy(n_steps=10)
    guid = _guidance(base, reward)
    torch.manual_seed(3)
    traj = sampler.rsample(base, guid, 64, stl=True)
    torch.manual_seed(3)
    ref = sampler.sample(base, guid, 64)
    torch.testing.assert_close(traj.stl_log_ratio.detach(), -ref.log_rnd, rtol=1e-10, atol=1e-10)
    assert (traj.stl_log_ratio - traj.control_cost).abs().max() > 1e-3  # the cross term is there
    assert sampler.rsample(base, guid, 8).stl_log_ratio is None


def test_pathwise_stl_gradient_matches_finite_differences_with_frozen_log_density(float64_default):
    """With a state-dependent ``h`` (the reward-informed one, whose features move with ``x_t``), the STL gradient is
    the derivative of ``E[log p^{theta_0}(x) - log p^0(x) - r(x_0)]`` w.r.t. the ``theta`` that generates the paths
    ``x``, at ``theta = theta_0``, with ``theta_0`` frozen in the log-density. Reference: central differences of that
    loss written out here from stored states (the no-grad sampler with common random numbers generates the
    perturbed paths; an unperturbed copy of the guidance evaluates ``Delta_{theta_0}(x_t)``). A log-ratio whose
    frozen shift ignored how ``x_t`` moves, or a flipped sign, would differ."""
    import copy

    n = 10
    prior, reward, base, sampler = _toy(n_steps=n)
    guid = _guidance(base, reward)
    frozen = copy.deepcopy(guid)
    params = list(guid.parameters())
    disc = _ddpm(n)

    def reference_loss() -> float:  # paths of the current guid; log-density of the frozen copy (theta_0)
        torch.manual_seed(7)
        traj = sampler.sample(base, guid, 64, keep_states=True)
        total = -reward.log_tilt(traj.x0).double()
        for i, k in enumerate(range(n, 0, -1)):
            x, x_next = traj.states[i], traj.states[i + 1]
            s = x_next - traj.base_means[i]  # x_{t-1} - mu^0(x_t)
            beta, alpha = float(disc["beta"][k]), float(disc["alpha"][k])
            d = beta / math.sqrt(alpha) * frozen(x, torch.full((x.shape[0],), k / n, dtype=x.dtype), traj.x0_hats[i])
            total = total + ((s ** 2).sum(1) - ((s - d) ** 2).sum(1)) / (2 * beta)
        return total.mean().item()

    torch.manual_seed(7)
    traj = sampler.rsample(base, guid, 64, stl=True)
    loss = (traj.stl_log_ratio - reward.log_tilt_autograd(traj.x0)).mean()
    assert loss.item() == pytest.approx(reference_loss(), rel=1e-10)  # the same loss, in value
    grads = torch.autograd.grad(loss, params)
    direction = [torch.randn_like(p) for p in params]
    analytic = sum((g * d).sum() for g, d in zip(grads, direction)).item()
    h = 1e-6
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.add_(h * d)
        plus = reference_loss()
        for p, d in zip(params, direction):
            p.sub_(2 * h * d)
        minus = reference_loss()
        for p, d in zip(params, direction):
            p.add_(h * d)
    assert abs(analytic) > 1e-2
    assert (plus - minus) / (2 * h) == pytest.approx(analytic, rel=1e-5)


def test_pathwise_stl_gradient_is_unbiased_gaussian_linear(float64_default):
    """Away from the optimum, the mean over paths of the sticking-the-landing gradient of
    ``stl_log_ratio - <b, x_0>`` equals the closed-form gradient of ``KL(P^h || P^tilt)`` (it drops a zero-mean
    score term only)."""
    torch.manual_seed(0)
    n = 6
    base, sampler, reward, kl_grad, _, _ = _gaussian_linear(n)
    guid = StepwiseConstant(n, 2)
    grads = []
    for _ in range(10):
        traj = sampler.rsample(base, guid, 20_000, stl=True)
        loss = (traj.stl_log_ratio - reward.log_tilt_autograd(traj.x0).double()).mean()
        grads.append(torch.autograd.grad(loss, guid.theta)[0].double())
    g = torch.stack(grads)
    mean, se = g.mean(0)[1:], g.std(0)[1:] / math.sqrt(len(grads))
    expected = kl_grad(guid.theta.detach())[1:]
    assert ((mean - expected).abs() <= 4 * se + 1e-6).all(), (mean, expected, se)
    assert expected.abs().max() > 20 * se.max()  # the test has power


def test_pathwise_stl_gradient_vanishes_path_by_path_at_the_optimum(float64_default):
    """At the optimal control the path law given ``x_N`` is the tilted one, so on every path
    ``log dP^h/dP^0 - r(x_0) = -log E[e^r | x_N]`` (``x_N`` is not controlled, and does not move with ``theta``):
    the STL gradient of every single path is 0 (zero variance). (Here the optimal control does not depend on the
    state, so the analytic-KL estimator ``control_cost - r`` happens to vanish too; they differ by
    ``<z_t, grad_x Delta_t dx_t/dtheta> / sigma_t``.)"""
    torch.manual_seed(0)
    n = 6
    base, sampler, reward, kl_grad, optimum, g_n1 = _gaussian_linear(n)
    guid = StepwiseConstant(n, 2)
    with torch.no_grad():
        guid.theta.copy_(optimum)
    assert kl_grad(guid.theta.detach()).abs().max() < 1e-12  # the closed-form optimum
    torch.manual_seed(1)
    x_n = base.prior_sample(256)
    torch.manual_seed(1)
    traj = sampler.rsample(base, guid, 256, stl=True)
    r = reward.log_tilt_autograd(traj.x0).double()
    per_path = traj.stl_log_ratio - r
    value = per_path.detach() + g_n1 * (x_n.double() @ reward.b.double())  # + log E[e^r | x_N] - const
    assert per_path.detach().std() > 1e-3 and value.std() < 1e-10
    weights = torch.randn(256)  # a random combination of the per-path gradients is 0 iff (a.s.) each one is
    assert torch.autograd.grad((weights * per_path).sum(), guid.theta)[0].abs().max() < 1e-9
    with torch.no_grad():  # away from the optimum the same combination is not 0 (the check has power)
        guid.theta.add_(0.1 * torch.randn_like(guid.theta))
    traj = sampler.rsample(base, guid, 256, stl=True)
    per_path = traj.stl_log_ratio - reward.log_tilt_autograd(traj.x0).double()
    assert torch.autograd.grad((weights * per_path).sum(), guid.theta)[0].abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
@pytest.mark.parametrize("method", ["pathwise", "vargrad", "dpok", "am"])
def test_method_runs_and_resumes_to_the_same_result(tmp_path, monkeypatch, method):
    """A few iterations end to end; a run killed after iteration 1 and resumed ends identical to a straight run
    (guidance, optimiser, method state such as DPOK's value net and transitions or AM's clip threshold, RNG)."""
    from hydra.utils import get_class
    overrides = [*FAST, f"method={method}", "iterations=3", "checkpoint_every=1"]
    cfg, choices = compose(overrides)
    reference = train(cfg, tmp_path / "straight", choices)
    assert reference["iterations"] == 3 and 0 <= reference["mode_tv"] <= 1 and reference["base_nfe"] > 0

    cls = get_class(cfg.method._target_)
    original = kill_fit_step_at(monkeypatch, cls, 2)
    with pytest.raises(KeyboardInterrupt):
        train(*compose(overrides)[:1], tmp_path / "killed", choices)
    monkeypatch.setattr(cls, "fit_step", original)
    resumed = train(compose(overrides)[0], tmp_path / "killed", choices)
    keys = ("mode_tv", "energy_distance", "reward_mean", "sc_loss", "base_nfe", "reward_evals", "reward_grad_evals")
    assert {k: resumed[k] for k in keys} == {k: reference[k] for k in keys}


@pytest.mark.parametrize("method", ["pathwise", "am"])
def test_gradient_methods_refuse_a_black_box_reward_at_start_up(tmp_path, method):
    from iif.utils import ConfigError
    cfg, choices = compose([*FAST, f"method={method}", "reward=gmm_blackbox", "guidance=mlp"])
    with pytest.raises(ConfigError, match=f"method '{method}' needs differentiable reward.*reward 'gmm_blackbox'"):
        train(cfg, tmp_path / "r", choices)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("method", ["vargrad", "dpok"])
def test_value_only_methods_run_with_a_black_box_reward(tmp_path, method):
    """VarGrad and DPOK use reward values only: with a gradient-free guidance they accept a black-box reward,
    and no reward gradient is ever taken."""
    cfg, choices = compose([*FAST, f"method={method}", "reward=gmm_blackbox", "guidance=mlp"])
    final = train(cfg, tmp_path / "r", choices)
    assert final["reward_grad_evals"] == 0 and final["reward_evals"] > 0


def test_methods_needing_base_vjps_refuse_a_base_without_them(tmp_path, monkeypatch):
    """A base model that cannot be differentiated in x (e.g. a compiled or remote model) cannot serve AM or the
    pathwise method; the error names the method and the base model."""
    from iif.utils import ConfigError
    monkeypatch.setattr(GMMExact, "provides", frozenset())
    cfg, choices = compose([*FAST, "method=am"])
    with pytest.raises(ConfigError, match="method 'am' needs differentiable base.*base_model 'gmm_exact'"):
        train(cfg, tmp_path / "r", choices)
    cfg, choices = compose([*FAST, "method=dpok"])  # per-step kernels suffice
    assert train(cfg, tmp_path / "ok", choices)["iterations"] == 2


@pytest.mark.parametrize("method", ["pathwise", "vargrad", "dpok", "am"])
def test_method_runs_on_the_learned_base(tmp_path, method):
    """The same methods on the MLP base (pretrained by the suite; debug=fast: 200 steps): backpropagation and base
    VJPs go through the network in x, its weights stay frozen."""
    cfg, choices = compose(["debug=fast", "logger=none", "base_model=toy2d", f"method={method}"])
    final = train(cfg, tmp_path / "r", choices)
    assert final["base_model"] == "toy2d" and 0 <= final["mode_tv"] <= 1 and final["base_nfe"] > 0
    assert math.isfinite(final["sc_loss"])
