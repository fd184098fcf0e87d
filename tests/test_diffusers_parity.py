"""Our DDPM and DDIM steps against diffusers' schedulers (an independent reference): with the same noise passed in,
each step, and a whole guided chain, equal ``DDPMScheduler.step`` / ``DDIMScheduler.step`` to float tolerance."""
from __future__ import annotations

import pytest
import torch

from iif.base_models.base import BaseModel
from iif.guidance.base import Guidance
from iif.samplers.ddim import DDIMSampler
from iif.samplers.ddpm import DDPMSampler
from iif.schedules import DiscreteSchedule

diffusers = pytest.importorskip("diffusers")

T = 1000
SHAPE = (2, 4, 4)


def _schedule(beta_schedule: str = "linear") -> DiscreteSchedule:
    return DiscreteSchedule(T, beta_start=1e-4 if beta_schedule == "linear" else 8.5e-4,
                            beta_end=0.02 if beta_schedule == "linear" else 0.012, beta_schedule=beta_schedule)


class _Linear(BaseModel):
    """``eps(x, t) = tanh(W x) * (1 + t)``: a fixed, state- and time-dependent prediction."""

    def __init__(self, schedule):
        super().__init__(schedule, SHAPE)
        g = torch.Generator().manual_seed(0)
        self.w = torch.randn(32, 32, generator=g, dtype=torch.float64) / 6

    def predict(self, x, t, cond=None):
        y = torch.tanh(x.double().flatten(1) @ self.w).view(x.shape)
        return (y * (1 + t.double().view(-1, 1, 1, 1))).to(x.dtype)


class _Tilt(Guidance):
    """A fixed guidance ``h(x, t) = -0.5 x + 0.3`` in score units."""

    def forward(self, x, t, x0_hat, cond=None):
        return -0.5 * x + 0.3


def _ddim_scheduler(eta_spacing: str, beta_schedule: str = "linear", steps_offset: int = 0):
    kw = dict(beta_start=1e-4, beta_end=0.02) if beta_schedule == "linear" else dict(beta_start=8.5e-4,
                                                                                     beta_end=0.012)
    return diffusers.DDIMScheduler(num_train_timesteps=T, beta_schedule=beta_schedule, clip_sample=False,
                                   set_alpha_to_one=True, timestep_spacing=eta_spacing, steps_offset=steps_offset,
                                   prediction_type="epsilon", **kw)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_equals_diffusers(eta, spacing):
    """Every step of our DDIM (eta, spacing) equals ``DDIMScheduler.step(eps, t, x, eta, variance_noise=z)`` on
    random states, and its times are diffusers' timesteps ``k`` as ``(k + 1) / T``."""
    n = 10
    base = _Linear(_schedule())
    ref = _ddim_scheduler(spacing)
    ref.set_timesteps(n)
    kernels = DDIMSampler(n, eta=eta, spacing=spacing).kernels(base)
    assert [round(k.t * T) - 1 for k in kernels] == ref.timesteps.tolist()
    g = torch.Generator().manual_seed(1)
    for k, ts in zip(kernels, ref.timesteps):
        x = torch.randn(3, *SHAPE, generator=g)
        z = torch.randn(3, *SHAPE, generator=g)
        eps = base.eps(x, k.times(3))
        ours = k.base_mean(x, eps) + k.std * z
        theirs = ref.step(eps, ts, x, eta=eta, variance_noise=z).prev_sample
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        # the guided step is diffusers' step on the guided noise prediction eps - sigma_t h
        h = _Tilt()(x, k.times(3), None)
        guided = ours + k.shift(h) if k.guided else ours
        sigma_t = float(base.schedule.sigma(torch.tensor([k.t], dtype=torch.float64)))
        theirs_g = ref.step(eps - sigma_t * h, ts, x, eta=eta, variance_noise=z).prev_sample
        if k.guided:
            torch.testing.assert_close(guided, theirs_g, rtol=1e-5, atol=1e-5)
    assert kernels[-1].std == 0 and kernels[-1].guided == (eta == 0)
    assert all(k.std > 0 for k in kernels[:-1]) == (eta > 0)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddpm_step_equals_diffusers(spacing):
    """Our DDPM step (variance beta_t) equals ``DDPMScheduler.step`` with ``variance_type="fixed_large"`` and the
    same noise. diffusers adds no noise at timestep 0 (the last step of ``leading``), which is our
    ``last_step="noiseless"``; with ``trailing`` its last timestep is 49 and it adds noise there, as ours does."""
    n = 20
    base = _Linear(_schedule())
    ref = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule="linear", variance_type="fixed_large",
                                  clip_sample=False, timestep_spacing=spacing, prediction_type="epsilon")
    ref.set_timesteps(n)
    noisy = DDPMSampler(n, spacing=spacing).kernels(base)
    noiseless = DDPMSampler(n, spacing=spacing, last_step="noiseless").kernels(base)
    assert [round(k.t * T) - 1 for k in noisy] == ref.timesteps.tolist()
    for i, ts in enumerate(ref.timesteps):
        k = noisy[i] if ts > 0 else noiseless[i]
        x = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(10 + i))
        eps = base.eps(x, k.times(3))
        z = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(100 + i))
        theirs = ref.step(eps, ts, x, generator=torch.Generator().manual_seed(100 + i)).prev_sample
        ours = k.base_mean(x, eps) + k.std * z
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert noiseless[-1].std == 0 and not noiseless[-1].guided and noisy[-1].std > 0 and noisy[-1].guided
    assert all(k.std > 0 and k.guided for k in noiseless[:-1])


@pytest.mark.parametrize("sampler_eta", [("ddpm", None), ("ddim", 0.5), ("ddim", 0.0)])
def test_whole_guided_chain_equals_diffusers_loop(sampler_eta):
    """A whole guided chain of our sampler equals a diffusers loop fed the same prior draw and per-step noises, the
    guidance entering as ``eps - sigma_t h`` (classifier guidance) at every guided step: the loop, the order of the
    steps and the last step are the same, not just single steps."""
    name, eta = sampler_eta
    n = 12
    base = _Linear(_schedule("scaled_linear"))
    if name == "ddpm":
        sampler = DDPMSampler(n, spacing="leading", last_step="noiseless")
        ref = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule="scaled_linear", beta_start=8.5e-4,
                                      beta_end=0.012, variance_type="fixed_large", clip_sample=False)
    else:
        sampler = DDIMSampler(n, eta=eta, spacing="leading", steps_offset=1)
        ref = _ddim_scheduler("leading", "scaled_linear", steps_offset=1)
    ref.set_timesteps(n)
    torch.manual_seed(3)
    traj = sampler.sample(base, _Tilt(), 4, keep_states=True)
    x = traj.states[0]
    kernels = sampler.kernels(base)
    for i, (k, ts) in enumerate(zip(kernels, ref.timesteps)):
        t = k.times(4)
        eps = base.eps(x, t)
        if k.guided:
            eps = eps - float(base.schedule.sigma(torch.tensor([k.t], dtype=torch.float64))) * _Tilt()(x, t, None)
        if name == "ddpm":
            mean = ref.step(eps, ts, x, generator=torch.Generator()).prev_sample if i == n - 1 else None
            if mean is None:  # diffusers draws its own noise: rebuild its step from its mean and our noise
                var = 1 - ref.alphas_cumprod[ts] / ref.alphas_cumprod[ref.previous_timestep(ts)]
                no_noise = ref.step(eps, ts, x, generator=torch.Generator().manual_seed(0)).prev_sample
                drawn = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
                x = no_noise - var.sqrt() * drawn + var.sqrt() * traj.noises[i]
            else:
                x = mean
        else:
            x = ref.step(eps, ts, x, eta=eta, variance_noise=traj.noises[i]).prev_sample
        torch.testing.assert_close(traj.states[i + 1], x, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(traj.x0, x, rtol=1e-4, atol=1e-4)


def test_discrete_schedule_equals_diffusers_alphas_cumprod():
    """``DiscreteSchedule`` builds diffusers' ``alphas_cumprod`` for both beta schedules."""
    for kind, (b0, b1) in {"linear": (1e-4, 0.02), "scaled_linear": (8.5e-4, 0.012)}.items():
        ref = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule=kind, beta_start=b0, beta_end=b1)
        ours = DiscreteSchedule(T, beta_start=b0, beta_end=b1, beta_schedule=kind)
        torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod.double(), rtol=0, atol=0)
        k = torch.tensor([0, 17, 999])
        t = (k + 1).double() / T
        torch.testing.assert_close(ours.alphabar(t), ref.alphas_cumprod[k].double(), rtol=0, atol=0)
        assert float(ours.alphabar(torch.zeros(1, dtype=torch.float64))) == 1.0


class _Pred(BaseModel):
    """Returns a fixed prediction of its ``prediction_type`` (the conversion to ``eps`` is what is tested)."""

    def __init__(self, schedule, prediction_type, pred):
        super().__init__(schedule, SHAPE, prediction_type)
        self.pred = pred

    def predict(self, x, t, cond=None):
        return self.pred


@pytest.mark.parametrize("kind", ["v_prediction", "sample"])
def test_prediction_types_step_like_diffusers(kind):
    """A base that predicts ``v`` or ``x0`` is converted to ``eps`` in one place (``BaseModel.to_eps``): our DDIM step
    on the converted prediction equals ``DDIMScheduler(prediction_type=kind).step`` on the raw one."""
    n = 10
    ref = diffusers.DDIMScheduler(num_train_timesteps=T, beta_schedule="linear", clip_sample=False,
                                  set_alpha_to_one=True, prediction_type=kind)
    ref.set_timesteps(n)
    g = torch.Generator().manual_seed(5)
    kernels = DDIMSampler(n, eta=0.5).kernels(_Linear(_schedule()))
    for k, ts in zip(kernels, ref.timesteps):
        x, pred, z = (torch.randn(3, *SHAPE, generator=g) for _ in range(3))
        base = _Pred(_schedule(), "v" if kind == "v_prediction" else "x0", pred)
        ours = k.base_mean(x, base.eps(x, k.times(3))) + k.std * z
        theirs = ref.step(pred, ts, x, eta=0.5, variance_noise=z).prev_sample
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_flow_velocity_converts_to_the_noise_of_the_interpolation():
    """Rectified flow ``x_t = (1 - t) x0 + t eps`` with velocity ``u = eps - x0``: ``to_eps`` recovers ``eps`` and
    the Tweedie estimate recovers ``x0`` exactly; a deterministic DDIM step is the Euler step ``x + (s - t) u``."""
    from iif.schedules import RectifiedFlow

    g = torch.Generator().manual_seed(6)
    x0, eps = torch.randn(4, *SHAPE, generator=g, dtype=torch.float64), torch.randn(4, *SHAPE, generator=g,
                                                                                    dtype=torch.float64)
    t = torch.tensor([0.2, 0.5, 0.7, 0.9], dtype=torch.float64)
    tt = t.view(-1, 1, 1, 1)
    xt = (1 - tt) * x0 + tt * eps
    base = _Pred(RectifiedFlow(), "velocity", eps - x0)
    got = base.eps(xt, t)
    torch.testing.assert_close(got, eps)
    torch.testing.assert_close(base.x0_hat(xt, t, got), x0)
    k = DDIMSampler(5, eta=0.0).kernels(base)[1]  # from t = 0.8 to 0.6
    x = torch.randn(2, *SHAPE, generator=g, dtype=torch.float64)
    u = torch.randn(2, *SHAPE, generator=g, dtype=torch.float64)
    base.pred = u
    step = k.base_mean(x, base.eps(x, k.times(2, torch.float64)))
    torch.testing.assert_close(step, x + (k.s - k.t) * u)


def test_adjoint_matching_chain_equals_diffusers_with_its_betas():
    """``sampler=ddim_am`` (adjoint matching's SD chain): DDIM, eta = 1, trailing, on betas 0.002..0.009 while the
    network keeps its own schedule, ending at ``alphabar = (1 + alphabar_{t_1})/2``. Every step equals
    ``DDIMScheduler(beta_start=0.002, beta_end=0.009, trailing).step`` with that ``final_alpha_cumprod``; the last
    step is stochastic and guided, and its noising kernel is the VP transition ``1 - alphabar_{t_1}/alphabar_f``."""
    n = 10
    fine_tuning = DiscreteSchedule(T, beta_start=0.002, beta_end=0.009, beta_schedule="scaled_linear")
    base = _Linear(_schedule("scaled_linear"))
    sampler = DDIMSampler(n, eta=1.0, spacing="trailing", path=fine_tuning, final_alphabar="midpoint")
    ref = diffusers.DDIMScheduler(num_train_timesteps=T, beta_schedule="scaled_linear", beta_start=0.002,
                                  beta_end=0.009, clip_sample=False, timestep_spacing="trailing",
                                  prediction_type="epsilon")
    ref.set_timesteps(n)
    abar_f = (1 + ref.alphas_cumprod[ref.timesteps[-1]]) / 2
    ref.final_alpha_cumprod = abar_f
    kernels = sampler.kernels(base)
    assert [round(k.t * T) - 1 for k in kernels] == ref.timesteps.tolist()
    g = torch.Generator().manual_seed(2)
    for k, ts in zip(kernels, ref.timesteps):
        x, z = torch.randn(3, *SHAPE, generator=g), torch.randn(3, *SHAPE, generator=g)
        eps = base.eps(x, k.times(3))
        theirs = ref.step(eps, ts, x, eta=1.0, variance_noise=z).prev_sample
        torch.testing.assert_close(k.base_mean(x, eps) + k.std * z, theirs, rtol=1e-5, atol=1e-5)
    assert all(k.std > 0 and k.guided for k in kernels)
    a, v = kernels[-1].noising(sampler.path(base))
    abar_1 = float(ref.alphas_cumprod[ref.timesteps[-1]])
    assert v == pytest.approx(1 - abar_1 / float(abar_f), rel=1e-6)
    assert a == pytest.approx((abar_1 / float(abar_f)) ** 0.5)
    torch.manual_seed(0)
    assert sampler.sample(base, _Tilt(), 2).log_backward is not None  # every step has a density
    with pytest.raises(ValueError, match="training timesteps"):
        DDIMSampler(n, path=DiscreteSchedule(500)).kernels(base)
