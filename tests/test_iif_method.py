"""The pieces of the IIF update against independent references: the score-matching loss is minimised by the exact
h-transform h* (and its excess is exactly E||v (h - h*)||^2), the KL regulariser's single-time estimate, the
acceptance schedule, the buffer, and the zero initialisation of the guidance."""
from __future__ import annotations

import torch
import pytest

from iif.buffers.fifo import FIFOBuffer
from iif.gmm import GMM
from iif.guidance.base import Guidance
from iif.guidance.oracle import ExactTiltGuidance
from iif.guidance.reward_informed import RewardInformedGuidance
from iif.base_models.gmm_exact import GMMExact
from iif.methods.iif import IIF, PiecewiseConstant
from iif.rewards.gmm import GMMReward
from iif.samplers.ddpm import DDPMSampler
from iif.schedules.vp import VPSchedule
from iif.targets import TiltedGMMTarget
from iif.time_sampling import BetaTime, UniformTime


@pytest.fixture(scope="module")
def toy():
    prior = GMM.grid([-4.0, -2.0, 0.0, 2.0, 4.0], var=0.1)
    schedule = VPSchedule()
    reward = GMMReward([[2.0, 2.0], [2.0, -2.0], [-2.0, 2.0], [-2.0, -2.0]], [0.1, 0.2, 0.3, 0.4], var=1.0)
    target = TiltedGMMTarget(prior, reward)
    return prior, schedule, GMMExact(prior, schedule), reward, target


class Shifted(Guidance):
    """h* + delta(t), a known perturbation of the optimum."""

    def __init__(self, oracle, delta):
        super().__init__()
        self.oracle, self.delta = oracle, delta
        self.unused = torch.nn.Parameter(torch.zeros(1))  # IIF builds an optimiser over the parameters

    def forward(self, x, t, x0_hat, cond=None):
        return self.oracle(x, t, x0_hat) + self.delta(t)[:, None].to(x.dtype) * torch.tensor([1.0, -0.5])


def _method(toy, guidance, **kw):
    prior, schedule, base, reward, target = toy
    return IIF(base, reward, DDPMSampler(10), guidance, FIFOBuffer(10, 0), n_samples=8, **kw)


@pytest.mark.slow
def test_score_matching_excess_loss_is_weighted_distance_to_h_star(toy):
    """L(h) - L(h*) = E ||v(t) (h - h*)||^2 on target samples (the cross term has mean 0 only at h = h*)."""
    prior, schedule, base, reward, target = toy
    oracle = ExactTiltGuidance(prior, target.mixture, schedule)
    delta = lambda t: 0.7 * (1 - t)  # noqa: E731
    x0 = target.sample(200_000, generator=torch.Generator().manual_seed(0)).float()
    losses = {}
    for name, g in (("opt", Shifted(oracle, lambda t: 0 * t)), ("shift", Shifted(oracle, delta))):
        torch.manual_seed(1)  # common random numbers: the same t and eps for both
        losses[name] = _method(toy, g).loss(x0).item()
    torch.manual_seed(1)
    t = UniformTime()(len(x0), schedule)  # the times the loss drew
    v = schedule.v(t.double())
    expected = (v ** 2 * delta(t.double()) ** 2 * 1.25).mean().item()  # ||(1, -0.5)||^2 = 1.25
    assert losses["shift"] - losses["opt"] == pytest.approx(expected, rel=0.03)
    # a wrong sign of eps or of h in the loss would make h* no minimiser:
    torch.manual_seed(1)
    minus = _method(toy, Shifted(oracle, lambda t: -delta(t))).loss(x0).item()
    assert minus - losses["opt"] == pytest.approx(expected, rel=0.03)


def test_kl_regulariser_single_time_estimate(toy):
    """gamma * int_{t_min}^1 beta(t)/2 ||c||^2 dt for a constant h = c, with either time sampler (the estimate
    reweights by the sampler's density, so both must give the same closed form)."""
    prior, schedule, base, reward, target = toy

    class Const(Guidance):
        def __init__(self):
            super().__init__()
            self.unused = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, t, x0_hat, cond=None):
            return torch.tensor([0.3, -0.4]).expand_as(x)

    x0 = prior.sample(100_000, generator=torch.Generator().manual_seed(0)).float()
    t_min = 1e-3
    int_beta = schedule.beta_min * (1 - t_min) + 0.5 * (schedule.beta_max - schedule.beta_min) * (1 - t_min ** 2)
    for sampler in (UniformTime(t_min), BetaTime(t_min)):
        out = {}
        for gamma in (0.0, 2.0):
            torch.manual_seed(3)
            out[gamma] = _method(toy, Const(), kl_weight=gamma, time_sampler=sampler).loss(x0).item()
        assert out[2.0] - out[0.0] == pytest.approx(2.0 * 0.5 * 0.25 * int_beta, rel=0.02)


def test_beta_time_sampler_density():
    """BetaTime draws t with density proportional to beta(t) on [t_min, 1]: compare the histogram."""
    schedule = VPSchedule()
    torch.manual_seed(0)
    t = BetaTime(t_min=0.0)(400_000, schedule).double()
    edges = torch.linspace(0, 1, 11, dtype=torch.float64)
    hist = torch.histc(t, bins=10, min=0, max=1) / len(t)
    b0, db = schedule.beta_min, schedule.beta_max - schedule.beta_min
    cdf = b0 * edges + 0.5 * db * edges ** 2
    expected = (cdf[1:] - cdf[:-1]) / cdf[-1]
    assert torch.allclose(hist, expected, atol=3e-3)


def test_acceptance_schedule_and_validation():
    sched = PiecewiseConstant([0.1, 0.3, 0.5], [10, 20])
    assert [sched(i) for i in (0, 9, 10, 19, 20, 100)] == [0.1, 0.1, 0.3, 0.3, 0.5, 0.5]
    with pytest.raises(ValueError, match="needs 2 values"):
        PiecewiseConstant([0.1], [10])
    with pytest.raises(ValueError, match="increase"):
        PiecewiseConstant([0.1, 0.2, 0.3], [20, 10])


def test_fifo_buffer_keeps_newest_and_refuses_empty_draws():
    buf = FIFOBuffer(capacity=5, prefill=0)
    with pytest.raises(RuntimeError, match="buffer is empty"):
        buf.sample(2)
    buf.add(torch.arange(4.0)[:, None])
    buf.add(torch.arange(4.0, 7.0)[:, None])
    assert buf.data[:, 0].tolist() == [2.0, 3.0, 4.0, 5.0, 6.0]
    torch.manual_seed(0)
    x, cond = buf.sample(1000)
    assert set(x[:, 0].tolist()) == {2.0, 3.0, 4.0, 5.0, 6.0} and cond is None
    with pytest.raises(ValueError, match="prefill"):
        FIFOBuffer(capacity=5, prefill=6)


def test_reward_informed_guidance_starts_at_zero_and_learns(toy):
    """Zero-initialised: the fine-tuned chain equals the base chain at step 0; both heads receive gradients."""
    prior, schedule, base, reward, target = toy
    g = RewardInformedGuidance(base, reward)
    x, t = torch.randn(64, 2), torch.rand(64)
    h = g(x, t, x + 0.1)
    assert torch.equal(h, torch.zeros_like(h))
    (h * torch.randn_like(h)).sum().backward()
    assert g.nn1.head.weight.grad.abs().sum() > 0 and g.nn2.head.weight.grad.abs().sum() > 0


def test_samples_per_condition_draws_groups_and_one_constant_each(toy):
    """``samples_per_condition = G``: an iteration draws ``N / G`` conditions, each for ``G`` consecutive
    trajectories, and keeps about ``rho G`` of every group (here ``rho = 1/2``, ``G = 8``: the per-group constant
    keeps some of each of the 4 conditions in every iteration's accepted set); bad values are one clear error."""
    from iif.conditions.base import ConditionSource

    class Counter(ConditionSource):
        """Conditions 0, 1, 2, ... in the order drawn."""

        def __init__(self):
            self.drawn = 0

        def sample(self, n):
            out = torch.arange(self.drawn, self.drawn + n, dtype=torch.float32)
            self.drawn += n
            return out

    prior, schedule, base, reward, target = toy
    torch.manual_seed(0)
    source = Counter()
    method = IIF(base, reward, DDPMSampler(10), RewardInformedGuidance(base, reward), FIFOBuffer(1000, 0), source,
                 n_samples=32, batch_size=8, grad_steps=1, acceptance=0.5, samples_per_condition=8)
    method.setup()
    stats = method.fit_step(0)
    assert source.drawn == 4
    kept = method.buffer.cond
    assert set(kept.tolist()) == {0.0, 1.0, 2.0, 3.0} and len(kept) == round(stats["accept_rate"] * 32)
    assert 0 < stats["ess_frac"] <= 1
    for bad in (1, 3):
        with pytest.raises(ValueError, match="samples_per_condition must be >= 2 and divide method.n_samples"):
            IIF(base, reward, DDPMSampler(10), RewardInformedGuidance(base, reward), FIFOBuffer(10, 0), source,
                n_samples=32, samples_per_condition=bad)
    with pytest.raises(ValueError, match="conditions=none has none"):
        IIF(base, reward, DDPMSampler(10), RewardInformedGuidance(base, reward), FIFOBuffer(10, 0),
            n_samples=32, samples_per_condition=8)
