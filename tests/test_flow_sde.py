"""``sampler=flow_sde``: Euler–Maruyama of the reverse-time SDE with the path's marginals, and the rectified flow's
shifted grid.

References, all written out here (not read from ``iif``): the time grids (uniform in ``u``, then diffusers' time
shift, itself checked against ``FlowMatchEulerDiscreteScheduler.set_timesteps``); for Gaussian data
``N(m, s^2 I)`` the exact noise prediction of the path, the SDE's drift and diffusion (``f``, ``g^2`` per path), and
the exact mean and variance of the discrete chain (each step is affine-Gaussian); torch.distributions densities for
the path log-RND; on the tiny SD3, the transformer called directly on the text inputs of a stock
``StableDiffusion3Pipeline.encode_prompt``.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import distributions as td

from iif.base_models.base import BaseModel
from iif.guidance.base import Guidance
from iif.samplers.flow_sde import FlowSDESampler
from iif.schedules import RectifiedFlow, VPSchedule

DT = torch.float64
M, S = 0.7, 0.5  # data N(M, S^2) per coordinate
B_MIN, B_MAX = 0.1, 20.0


# ---------------------------------------------------------------------------------------------- the paths, by hand
class _RF:
    """Rectified flow ``alpha = 1 - t``, ``sigma = t``: ``f = -1/(1 - t)``, ``g^2 = 2 t/(1 - t)``; grid uniform in
    ``u`` up to ``shift^-1(t_max)``, then ``t = shift u / (1 + (shift - 1) u)``."""

    def __init__(self, shift: float = 1.0, t_max: float = 0.999):
        self.shift, self.t_max = shift, t_max

    def alpha(self, t):
        return 1 - t

    def sigma(self, t):
        return t

    def f(self, t):
        return -1 / (1 - t)

    def g2(self, t):
        return 2 * t / (1 - t)

    def grid(self, n):
        u_max = self.t_max / (self.shift - (self.shift - 1) * self.t_max)
        u = [u_max * k / n for k in range(n + 1)]
        return [self.shift * v / (1 + (self.shift - 1) * v) for v in u]

    def schedule(self):
        return RectifiedFlow(self.t_max, self.shift)


class _VP:
    """The VP-SDE: ``beta(t) = b0 + t (b1 - b0)``, ``f = -beta/2``, ``g^2 = beta``, ``alpha = exp(-int beta/2)``."""

    def alpha(self, t):
        return math.exp(-0.25 * t ** 2 * (B_MAX - B_MIN) - 0.5 * t * B_MIN)

    def sigma(self, t):
        return math.sqrt(1 - self.alpha(t) ** 2)

    def f(self, t):
        return -(B_MIN + t * (B_MAX - B_MIN)) / 2

    def g2(self, t):
        return B_MIN + t * (B_MAX - B_MIN)

    def grid(self, n):
        return [k / n for k in range(n + 1)]

    def schedule(self):
        return VPSchedule(B_MIN, B_MAX)


PATHS = {"rf": _RF(), "rf_shift3": _RF(3.0), "vp": _VP()}


class _Gaussian(BaseModel):
    """The exact base for data ``N(M, S^2 I)`` on a path: ``eps(x, t) = sigma (x - alpha M) / (alpha^2 S^2 +
    sigma^2)``; returned as the flow velocity ``u = alpha' x0_hat + sigma' eps`` on rectified flow (what SD3
    predicts) to exercise the conversion, as ``eps`` on the VP path."""

    def __init__(self, path, d: int = 2):
        rf = isinstance(path, _RF)
        super().__init__(path.schedule(), (d,), "velocity" if rf else "eps")
        self.path, self.rf = path, rf

    def predict(self, x, t, cond=None):
        tt = t.double()[:, None]
        if self.rf:
            a, s = 1 - tt, tt
        else:
            a = torch.exp(-0.25 * tt ** 2 * (B_MAX - B_MIN) - 0.5 * tt * B_MIN)
            s = (1 - a ** 2).sqrt()
        eps = s * (x.double() - a * M) / (a ** 2 * S ** 2 + s ** 2)
        if not self.rf:
            return eps.to(x.dtype)
        x0 = (x.double() - s * eps) / a
        return (eps - x0).to(x.dtype)  # u = -x0 + eps


def _step_map(path, t: float, s: float, noise_scale: float, last: bool):
    """The chain's step ``x_t -> x_s`` for Gaussian data, from the SDE: ``x_s = A x + B + c z``.

    Euler–Maruyama: ``x + [-f x + (g^2 + nu^2)/2 score(x)] dt + nu sqrt(dt) z``, ``score = -(x - alpha M)/V``,
    ``V = alpha^2 S^2 + sigma^2``, ``nu^2 = noise_scale^2 g^2``; the last step: Tweedie's
    ``E[x_0 | x_t] = alpha S^2 x / V + sigma^2 M / V``."""
    a, sg = path.alpha(t), path.sigma(t)
    v = a * a * S * S + sg * sg
    if last:
        return a * S * S / v, sg * sg * M / v, 0.0
    dt = t - s
    w = (path.g2(t) + noise_scale ** 2 * path.g2(t)) / 2
    return 1 - path.f(t) * dt - w * dt / v, w * dt * a * M / v, math.sqrt(noise_scale ** 2 * path.g2(t) * dt)


def _chain_law(path, n: int, noise_scale: float = 1.0) -> tuple[float, float]:
    """Mean and variance (per coordinate) of ``x_0`` for ``x_{t_N} ~ N(0, 1)``, propagated exactly."""
    t = path.grid(n)
    mean, var = 0.0, 1.0
    for k in range(n, 0, -1):
        A, B, c = _step_map(path, t[k], t[k - 1], noise_scale, last=k == 1)
        mean, var = A * mean + B, A * A * var + c * c
    return mean, var


# ---------------------------------------------------------------------------------------------- grids
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_rectified_flow_grid_is_the_shifted_uniform_grid(shift):
    """``RectifiedFlow(shift).grid(N)`` is ``shift(u_k)`` on ``u_k = u_max k/N`` ending at ``t_max``; the shift is
    diffusers': ``FlowMatchEulerDiscreteScheduler(shift).set_timesteps(sigmas=u)`` gives these times, and on its own
    default grid ``set_timesteps(N)`` gives ``time_shift(linspace(1, time_shift(1/1000), N))``."""
    diffusers = pytest.importorskip("diffusers")
    n = 28
    path = RectifiedFlow(0.999, shift)
    grid = path.grid(n)
    torch.testing.assert_close(grid, torch.tensor(_RF(shift).grid(n), dtype=DT), rtol=1e-14, atol=1e-15)
    assert grid[0] == 0 and grid[-1] == 0.999 and (grid.diff() > 0).all()
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    u = path.inverse_time_shift(grid[1:]).flip(0)  # noisiest first, as diffusers lists them
    sched.set_timesteps(sigmas=u.tolist())
    torch.testing.assert_close(sched.sigmas[:-1].double(), grid[1:].flip(0), rtol=1e-6, atol=1e-7)
    assert sched.sigmas[-1] == 0
    sched.set_timesteps(n)
    own = path.time_shift(torch.linspace(1, float(path.time_shift(torch.tensor(1 / 1000.0))), n, dtype=DT))
    torch.testing.assert_close(sched.sigmas[:-1].double(), own, rtol=1e-6, atol=1e-7)
    if shift != 1:  # the shift puts more steps at high noise
        assert (grid[-1] - grid[-2]) < 0.999 / n < (grid[1] - grid[0])


def test_options_are_checked():
    with pytest.raises(ValueError, match="sampler.noise_scale"):
        FlowSDESampler(10, noise_scale=0.0)
    with pytest.raises(ValueError, match="sampler.n_steps"):
        FlowSDESampler(1)
    with pytest.raises(ValueError, match="base_model.schedule.shift"):
        RectifiedFlow(shift=-1.0)


# ---------------------------------------------------------------------------------------------- (a) Gaussian data
@pytest.mark.parametrize("name", list(PATHS))
@pytest.mark.parametrize("noise_scale", [1.0, 0.5])
def test_kernels_are_the_euler_maruyama_steps(float64_default, name, noise_scale):
    """Each kernel, on the exact Gaussian base, is the SDE's affine step ``A x + B`` with std ``nu sqrt(dt)``
    (the last: Tweedie, std 0, unguided), on the path's grid."""
    path = PATHS[name]
    n = 12
    base = _Gaussian(path)
    kernels = FlowSDESampler(n, noise_scale=noise_scale).kernels(base)
    t = path.grid(n)
    assert [k.t for k in kernels] == pytest.approx(t[:0:-1], rel=1e-13)
    assert [k.s for k in kernels] == pytest.approx(t[-2::-1], rel=1e-13, abs=1e-15)
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    for i, k in enumerate(kernels):
        A, B, c = _step_map(path, k.t, k.s, noise_scale, last=i == n - 1)
        mean = k.base_mean(x, base.eps(x, k.times(5, x.dtype)))
        torch.testing.assert_close(mean, A * x + B, rtol=1e-10, atol=1e-10)
        assert k.std == pytest.approx(c, rel=1e-12, abs=0) and k.var == pytest.approx(c * c, rel=1e-12, abs=0)
        assert k.guided == (i < n - 1) and (k.std > 0) == (i < n - 1)


@pytest.mark.parametrize("name", list(PATHS))
def test_chain_law_converges_to_the_data(name):
    """The exact law of the chain's ``x_0`` tends to ``N(M, S^2)`` as the steps grow (memoryless noise; on rectified
    flow also at half of it): the error falls with ``N`` and is small at 1000 steps."""
    path = PATHS[name]
    for noise_scale in ([1.0, 0.5] if name != "vp" else [1.0]):
        errors = []
        for n in (25, 100, 1000):
            mean, var = _chain_law(path, n, noise_scale)
            errors.append(abs(mean - M) + abs(var - S * S))
        assert errors[0] > errors[1] > errors[2], (name, noise_scale, errors)
        assert errors[2] < 2e-3, (name, noise_scale, errors)


@pytest.mark.parametrize("name", ["rf_shift3", "vp"])
def test_samples_match_the_exact_chain_law(name):
    """Monte-Carlo samples of the sampler (20 steps) against the chain's exact mean and variance: within 5 standard
    errors (mean: ``sqrt(var/n)``; variance: ``var sqrt(2/n)``), ``n = 20000 x 2`` coordinates."""
    path = PATHS[name]
    base = _Gaussian(path)
    torch.manual_seed(0)
    x = FlowSDESampler(20).sample(base, None, 20000).x0.double().flatten()
    mean, var = _chain_law(path, 20)
    n = x.numel()
    assert abs(x.mean().item() - mean) < 5 * math.sqrt(var / n)
    assert abs(x.var().item() - var) < 5 * var * math.sqrt(2 / n)


def _chain_marginals(path, n: int, noise_scale: float = 1.0) -> list[tuple[float, float, float]]:
    """``(t_k, mean, variance)`` of the chain's state at every grid time between the start and ``x_0``
    (``k = N-1..1``), propagated exactly from ``x_{t_N} ~ N(0, 1)``."""
    t = path.grid(n)
    mean, var, out = 0.0, 1.0, []
    for k in range(n, 1, -1):
        A, B, c = _step_map(path, t[k], t[k - 1], noise_scale, last=False)
        mean, var = A * mean + B, A * A * var + c * c
        out.append((t[k - 1], mean, var))
    return out


@pytest.mark.parametrize("name", list(PATHS))
def test_chain_marginals_converge_to_the_paths_marginals(name):
    """At every intermediate grid time ``t <= 0.9`` the chain's exact law tends to the path's marginal
    ``N(alpha M, alpha^2 S^2 + sigma^2)`` (the SDE has the flow's marginals): the largest error falls with ``N`` and
    is below 0.02 at 1000 steps (memoryless noise; on rectified flow also at half of it).

    Not at the first steps on rectified flow: there ``f = -1/(1 - t)`` and ``g^2 = 2t/(1 - t)`` blow up at
    ``t_max = 0.999`` and the Euler-Maruyama step overshoots (the first state's variance is 400 instead of 0.96 at 50
    steps, 47 with shift 3), after which the contracting steps bring the chain back to the data's law
    (docs/text-to-image-models.md, the flow SDE's accuracy)."""
    path = PATHS[name]
    for noise_scale in ([1.0, 0.5] if name != "vp" else [1.0]):
        errors = []
        for n in (25, 100, 1000):
            errors.append(max(abs(mean - path.alpha(t) * M) + abs(var - path.alpha(t) ** 2 * S * S - path.sigma(t) ** 2)
                              for t, mean, var in _chain_marginals(path, n, noise_scale) if t <= 0.9))
        assert errors[0] > errors[1] > errors[2], (name, noise_scale, errors)
        assert errors[2] < 2e-2, (name, noise_scale, errors)


@pytest.mark.parametrize("name", ["rf_shift3", "vp"])
def test_intermediate_states_match_the_exact_chain_marginals(name):
    """The sampler's kept states (20 steps, ``keep_states``) at every intermediate grid time against the chain's
    exact mean and variance there: within 5 standard errors, ``n = 20000 x 2`` coordinates."""
    path = PATHS[name]
    torch.manual_seed(1)
    states = FlowSDESampler(20).sample(_Gaussian(path), None, 20000, keep_states=True).states.double()
    exact = _chain_marginals(path, 20)
    assert states.shape[0] == 21  # x_{t_20}, ..., x_{t_1}, x_0
    for i, (t, mean, var) in enumerate(exact, start=1):
        x = states[i].flatten()
        n = x.numel()
        assert abs(x.mean().item() - mean) < 5 * math.sqrt(var / n), (t, x.mean().item(), mean)
        assert abs(x.var().item() - var) < 5 * var * math.sqrt(2 / n), (t, x.var().item(), var)


# ---------------------------------------------------------------------------------------------- (b) log-RND
class _Tilt(Guidance):
    """A fixed guidance ``h(x, t) = -0.5 x + 0.3 t`` in score units."""

    def forward(self, x, t, x0_hat, cond=None):
        return -0.5 * x + 0.3 * t.view(-1, 1).to(x.dtype)


@pytest.mark.parametrize("name", ["rf_shift3", "vp"])
def test_guided_log_rnd_is_the_gaussian_density_ratio(float64_default, name):
    """With a fixed ``h``, each guided step is the Euler–Maruyama step of the guided SDE (score ``s + h``), and the
    path's log-RND is ``sum_k log N(x_s; mu^0, c^2) - log N(x_s; mu^0 + Delta, c^2)`` over the stochastic steps
    (torch.distributions); the last step is the base's Tweedie step."""
    path = PATHS[name]
    n, b = 8, 6
    base = _Gaussian(path)
    sampler = FlowSDESampler(n, noise_scale=0.8)
    torch.manual_seed(3)
    traj = sampler.sample(base, _Tilt(), b, keep_states=True)
    t = path.grid(n)
    expected = torch.zeros(b, dtype=DT)
    for i, k in enumerate(range(n, 0, -1)):
        x, x_s = traj.states[i], traj.states[i + 1]
        A, B, c = _step_map(path, t[k], t[k - 1], 0.8, last=k == 1)
        mu0 = A * x + B
        if k == 1:
            torch.testing.assert_close(x_s, mu0, rtol=1e-10, atol=1e-10)
            continue
        dt = t[k] - t[k - 1]
        g2 = path.g2(t[k])
        h = -0.5 * x + 0.3 * t[k]
        mu_h = mu0 + (g2 + 0.64 * g2) / 2 * h * dt  # the drift's score term with s + h
        torch.testing.assert_close(x_s, mu_h + c * traj.noises[i], rtol=1e-10, atol=1e-10)
        expected += (td.Normal(mu0, c).log_prob(x_s) - td.Normal(mu_h, c).log_prob(x_s)).sum(-1)
    assert expected.abs().min() > 1e-2
    torch.testing.assert_close(traj.log_rnd, expected, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------------------- (c) tiny SD3 + LoRA
@pytest.fixture(scope="module")
def sd3_lora():
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from iif.base_models.sd3 import SD3Base
    from iif.guidance.lora import LoRAGuidance

    base = SD3Base("tiny", ["a photo of a cat", "a red rabbit"], guidance_scale=3.0, max_sequence_length=8)
    return base, LoRAGuidance(base, rank=2, alpha=4.0, seed=1)


def test_sd3_lora_log_rnd_zero_at_init_then_the_gaussian_ratio(sd3_lora):
    """On the tiny SD3 with ``flow_sde`` (4 steps): LoRA on vs off gives log-RND exactly 0 and the base's samples at
    initialisation (``B = 0``); after perturbing the adapter, the per-step Gaussian log-density difference of the
    base and adapted Euler–Maruyama means, computed from the transformer called directly (text inputs from a stock
    ``StableDiffusion3Pipeline.encode_prompt``, timestep ``1000 t``, CFG of velocities, ``eps = z + (1 - t) u``)."""
    from diffusers import StableDiffusion3Pipeline

    from iif.base_models.sd3 import tiny_sd3_components

    base, guidance = sd3_lora
    sampler, n, cond = FlowSDESampler(4), 2, torch.tensor([1, 0])
    torch.manual_seed(11)
    guided = sampler.sample(base, guidance, n, cond=cond)
    torch.manual_seed(11)
    plain = sampler.sample(base, None, n, cond=cond)
    assert torch.equal(guided.log_rnd, torch.zeros(n, dtype=DT)) and torch.equal(guided.x0, plain.x0)

    parts = tiny_sd3_components(0)
    pipe = StableDiffusion3Pipeline(**{k: parts[k] for k in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3",
                                                             "tokenizer", "tokenizer_2", "tokenizer_3", "scheduler")},
                                    transformer=base.transformer)
    prompts = [base.texts[i] for i in cond.tolist()]
    with torch.no_grad():
        emb, neg, pooled, neg_pooled = pipe.encode_prompt(prompts, None, None, negative_prompt=[""] * n,
                                                          do_classifier_free_guidance=True, max_sequence_length=8)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in guidance.adapter_parameters().items():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g))

    @torch.no_grad()
    def eps(x, t: float, adapter: bool):
        tr = base.transformer
        tr.enable_adapters() if adapter else tr.disable_adapters()
        try:
            out = tr(torch.cat([x, x]), encoder_hidden_states=torch.cat([neg, emb]),
                     pooled_projections=torch.cat([neg_pooled, pooled]),
                     timestep=torch.full((2 * n,), 1000 * t)).sample
        finally:
            tr.disable_adapters()
        u, c = out.double().chunk(2)
        return x.double() + (1 - t) * (u + 3.0 * (c - u))

    torch.manual_seed(5)
    traj = sampler.sample(base, guidance, n, cond=cond, keep_states=True)
    rf, t = _RF(3.0), _RF(3.0).grid(4)
    expected = torch.zeros(n, dtype=DT)
    for i, k in enumerate(range(4, 1, -1)):
        x, x_s = traj.states[i], traj.states[i + 1].double()
        dt, g2 = t[k] - t[k - 1], rf.g2(t[k])
        mean = lambda e: x.double() + (-rf.f(t[k]) * x.double() - g2 / t[k] * e) * dt  # noqa: E731 (nu = g)
        mu0, mu_a, c = mean(eps(x, t[k], False)), mean(eps(x, t[k], True)), math.sqrt(g2 * dt)
        torch.testing.assert_close(traj.base_means[i].double(), mu0, rtol=1e-4, atol=1e-4)
        expected += (td.Normal(mu0, c).log_prob(x_s) - td.Normal(mu_a, c).log_prob(x_s)).flatten(1).sum(1)
    assert expected.abs().min() > 1e-2
    torch.testing.assert_close(traj.log_rnd, expected, rtol=1e-3, atol=1e-3)


def test_discrete_schedule_grid_and_rates():
    """On a discrete (SD 1.x) schedule: the grid is diffusers' (``steps_offset`` as DDIM's), and the rates are those
    of the training step at ``t``: ``g^2 = T beta_k``, ``f = -g^2/2`` (a VP path), so ``a_x = 1 + T beta_k dt / 2``,
    ``std = sqrt(T beta_k dt)`` (memoryless)."""
    from iif.samplers.ddim import DDIMSampler
    from iif.schedules import DiscreteSchedule

    class _Disc(BaseModel):
        def predict(self, x, t, cond=None):
            return x

    sched = DiscreteSchedule(1000, 0.00085, 0.012, "scaled_linear")
    base = _Disc(sched, (2,))
    kernels = FlowSDESampler(10, steps_offset=1).kernels(base)
    assert [k.t for k in kernels] == [k.t for k in DDIMSampler(10, steps_offset=1).kernels(base)]
    abar = sched.alphas_cumprod
    for k in kernels[:-1]:
        i = round(k.t * 1000) - 1
        g2 = 1000 * (1 - abar[i] / abar[i - 1]).item()
        dt = k.t - k.s
        assert k.a_x == pytest.approx(1 + g2 * dt / 2, rel=1e-12)
        assert k.std == pytest.approx(math.sqrt(g2 * dt), rel=1e-12)
        assert k.a_eps == pytest.approx(-g2 * dt / (1 - abar[i].item()) ** 0.5, rel=1e-12)
