"""Condition sources: draws and how they reach the guidance."""
from __future__ import annotations

import pytest
import torch

from iif.base_models.unet import UNetBase
from iif.conditions.labels import ClassLabels
from iif.conditions.measurements import Measurements
from iif.conditions.prompts import Prompts
from iif.guidance.conv_reward_informed import ConvRewardInformedGuidance
from iif.rewards.classifier import ClassifierReward
from iif.samplers.base import Trajectory
from iif.schedules import VPSchedule


class _Fixed:
    """A sampler stand-in that returns the same clean images every time."""

    def __init__(self, x0):
        self.x0 = x0

    def sample(self, base, guidance, n, **kw):
        return Trajectory(x0=self.x0[:n], log_rnd=torch.zeros(n, dtype=torch.float64), control_cost=None)


def test_measurements_are_the_pooled_image_plus_gaussian_noise():
    """``y = A x0 + sigma_y eps`` with ``A`` 2x2 average pooling (written out here by reshaping) and noise of std
    sigma_y: mean and std of ``y - A x0`` over 4000 draws within 5 standard errors."""
    torch.manual_seed(0)
    x0 = torch.randn(4000, 1, 8, 8)
    m = Measurements(factor=2, sigma_y=0.05)
    m.bind(base=None, sampler=_Fixed(x0))
    y = m.sample(4000)
    pooled = x0.reshape(4000, 1, 4, 2, 4, 2).mean(dim=(3, 5))
    r = (y - pooled).flatten()
    assert y.shape == (4000, 1, 4, 4)
    assert abs(r.mean().item()) < 5 * 0.05 / r.numel() ** 0.5
    assert abs(r.std().item() - 0.05) < 5 * 0.05 / (2 * r.numel()) ** 0.5


def test_labels_and_prompts_draw_from_their_lists():
    torch.manual_seed(0)
    c = ClassLabels([2, 7]).sample(1000)
    assert set(c.tolist()) == {2, 7} and abs((c == 7).float().mean().item() - 0.5) < 0.05
    p = Prompts(["a", "b", "c"])
    idx = p.sample(30)
    assert set(idx.tolist()) <= {0, 1, 2} and p.text(idx[:2]) == [p.texts[int(i)] for i in idx[:2]]


def test_amortised_guidance_receives_the_measurement():
    """The convolutional reward-informed h with an image condition: changing ``y`` changes ``h`` (once NN1 is not
    zero), the same ``y`` gives the same ``h``."""
    torch.manual_seed(0)
    base = UNetBase(VPSchedule(), (1, 8, 8))
    g = ConvRewardInformedGuidance(base, ClassifierReward([3]), cond_channels=1)
    torch.nn.init.normal_(g.nn1.conv_out.weight, std=0.1)
    x, x0_hat, t = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8), torch.full((2,), 0.5)
    y = torch.randn(2, 1, 4, 4)
    h1, h2, h3 = g(x, t, x0_hat, y), g(x, t, x0_hat, y.clone()), g(x, t, x0_hat, y + 1.0)
    assert torch.equal(h1, h2)
    assert (h1 - h3).abs().max() > 1e-3


def test_nn1_sees_the_scaled_reward_gradient_and_nn2_the_raw_one():
    """``h = NN1([x, x0_hat, s grad r, y]) + NN2(t) grad r``: NN1's third input channel is ``s`` times the reward
    gradient at ``x0_hat`` (e.g. ``s = sigma_y^2`` for super-resolution), NN2's term uses the unscaled gradient
    (with NN1's output at zero, ``h`` is ``NN2(t) grad r`` whatever ``s``)."""
    from iif.rewards.superres import SuperResolutionReward

    torch.manual_seed(0)
    base = UNetBase(VPSchedule(), (1, 8, 8))
    reward = SuperResolutionReward(factor=2, sigma_y=0.05)
    x, x0_hat, t = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8), torch.full((2,), 0.5)
    y = torch.randn(2, 1, 4, 4)
    grad = reward.grad_log_tilt(x0_hat, y)
    hs = []
    for s in (1.0, 0.0025):
        g = ConvRewardInformedGuidance(base, reward, cond_channels=1, nn2_init=0.3, grad_feature_scale=s)
        seen = []
        g.nn1.register_forward_pre_hook(lambda mod, args, kw: seen.append(args[0]), with_kwargs=True)
        hs.append(g(x, t, x0_hat, y))
        torch.testing.assert_close(seen[0][:, 2:3], s * grad.to(seen[0].dtype))
        torch.testing.assert_close(seen[0][:, :1], x)
    torch.testing.assert_close(hs[0], hs[1])
    torch.testing.assert_close(hs[0], 0.3 * grad.to(hs[0].dtype), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="grad_feature_scale"):
        ConvRewardInformedGuidance(base, reward, grad_feature_scale=0.0)


def test_nn2_scale_keeps_the_initial_h_and_shrinks_nn2s_steps():
    """``NN2(t) = s_2 MLP(t)``: at initialisation ``h = nn2_init grad r`` whatever ``s_2``; the gradient of a loss
    on the head's bias is ``s_2 dL/dNN2``, so a step of the bias moves ``NN2`` by ``s_2^2`` times the unscaled one
    (here ``L = sum h . grad r``, ``dL/dNN2 = sum |grad r|^2`` in closed form); a scale <= 0 is refused."""
    from iif.rewards.superres import SuperResolutionReward

    torch.manual_seed(0)
    base = UNetBase(VPSchedule(), (1, 8, 8))
    reward = SuperResolutionReward(factor=2, sigma_y=0.05)
    x, x0_hat, t = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8), torch.full((2,), 0.5)
    y = torch.randn(2, 1, 4, 4)
    x, x0_hat, t, y = x.double(), x0_hat.double(), t.double(), y.double()
    grad = reward.grad_log_tilt(x0_hat, y)
    for s2 in (1.0, 0.01):
        g = ConvRewardInformedGuidance(base, reward, cond_channels=1, nn2_init=0.3, nn2_scale=s2).double()
        h = g(x, t, x0_hat, y)
        torch.testing.assert_close(h, 0.3 * grad)
        (h * grad).sum().backward()
        torch.testing.assert_close(g.nn2.head.bias.grad, s2 * (grad ** 2).sum().reshape(1))
    with pytest.raises(ValueError, match="nn2_scale"):
        ConvRewardInformedGuidance(base, reward, nn2_scale=0.0)


def test_label_and_prompt_features_are_one_hots_of_the_position_in_the_list():
    """``ClassLabels``: the one-hot of the label's position in ``classes`` (not of the label itself); ``Prompts``: of
    the prompt index; float32, ``feature_dim`` columns; ``Unconditional``: no features."""
    from iif.conditions.base import Unconditional

    classes = [7, 2, 5]
    labels = ClassLabels(classes)
    cond = torch.tensor([5, 7, 2, 2, 5])
    f = labels.features(cond)
    ref = torch.nn.functional.one_hot(torch.tensor([classes.index(int(c)) for c in cond]), len(classes))
    assert f.dtype == torch.float32 and torch.equal(f, ref.float())
    assert f.shape == (5, labels.feature_dim((1, 8, 8))) == (5, 3)
    prompts = Prompts(["a", "b", "c", "d"])
    idx = torch.tensor([3, 0, 0, 2])
    f = prompts.features(idx)
    assert f.dtype == torch.float32 and torch.equal(f, torch.nn.functional.one_hot(idx, 4).float())
    assert f.shape[1] == prompts.feature_dim((4, 8, 8)) == 4
    assert Unconditional().feature_dim((2,)) == 0 and Unconditional().features(None) is None


def test_measurement_features_are_the_flattened_measurement():
    """``features(y) = y.flatten(1)``, as wide as ``feature_dim`` says for the measurements of samples of that shape
    (``A`` applied to an image of the shape, an odd size included: pooling drops the last row and column)."""
    m = Measurements(factor=2)
    for shape in [(1, 8, 8), (3, 8, 6), (1, 9, 9)]:
        y = m.operator(torch.randn(2, *shape))
        f = m.features(y)
        assert f.dtype == torch.float32 and torch.equal(f, y.flatten(1))
        assert f.shape == (2, m.feature_dim(shape))


def test_base_pairs_draw_the_base_under_the_conditions_or_measure_the_base_samples():
    """A buffer's prefill pairs: labels (and prompts) are drawn first and the base sampled under them; a measurement
    is taken of each base sample itself, ``y = A x_0 + sigma_y xi`` (the residual over ``sigma_y`` is standard
    normal; against torch's ``avg_pool2d`` as ``A``)."""
    torch.manual_seed(0)
    seen = []

    def draw(cond):
        seen.append(cond)
        return torch.rand(256, 1, 8, 8) * 2 - 1

    x0, cond = ClassLabels([1, 7]).base_pairs(256, draw)
    assert seen[0] is cond and set(cond.tolist()) == {1, 7} and x0.shape == (256, 1, 8, 8)
    x0, y = Measurements(factor=2, sigma_y=0.05).base_pairs(256, draw)
    assert seen[1] is None
    z = (y - torch.nn.functional.avg_pool2d(x0, 2)) / 0.05
    assert z.shape == (256, 1, 4, 4)
    assert abs(z.mean().item()) < 0.05 and abs(z.std().item() - 1) < 0.05


def test_a_label_outside_the_list_is_a_clear_error():
    with pytest.raises(ValueError, match=r"class label\(s\) \[4\] not in conditions.classes \[7, 2, 5\]"):
        ClassLabels([7, 2, 5]).features(torch.tensor([2, 4, 7]))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("t", [0.05, 0.2, 0.5, 0.8])
def test_superres_optimal_h_is_kappa_times_the_reward_gradient_at_the_tweedie_estimate(t, temperature):
    """docs/images.md, "The size of NN2": for the base ``N(0, I)`` on the VP path and the super-resolution reward at
    temperature ``lambda``, ``h*(x_t) = kappa(t) grad (r / lambda)(x0_hat)`` with
    ``kappa = alpha lambda sigma_y^2 / (lambda sigma_y^2 + sigma^2/4)`` and ``x0_hat = alpha x_t``; the untrained
    ``conv_reward_informed`` guidance with ``nn2_prior`` (NN1's output is zero) is that ``h*``. Reference: the exact
    tilt (``ExactTiltGuidance``) of the prior by the tempered likelihood, the Gaussian ``N(mu, S)``,
    ``S = (I + A^T A / (lambda sigma_y^2))^-1``, ``mu = S A^T y / (lambda sigma_y^2)``, with ``A`` the 2x2 average
    pooling as a matrix (torch's ``avg_pool2d`` of the basis images)."""
    from iif.gmm import GMM
    from iif.guidance.oracle import ExactTiltGuidance
    from iif.rewards.superres import SuperResolutionReward

    torch.manual_seed(0)
    sigma_y, shape = 0.05, (1, 4, 4)
    d = 16
    reward = SuperResolutionReward(factor=2, sigma_y=sigma_y, temperature=temperature)
    # A [4, 16] column by column: the pooling of each basis image
    eye = torch.eye(d, dtype=torch.float64)
    a = torch.stack([torch.nn.functional.avg_pool2d(e.view(1, *shape), 2).flatten() for e in eye], dim=1)
    y = torch.randn(1, 1, 2, 2, dtype=torch.float64)
    noise = temperature * sigma_y ** 2
    cov = torch.linalg.inv(eye + a.T @ a / noise)
    mu = cov @ a.T @ y.flatten() / noise
    prior = GMM(torch.ones(1), torch.zeros(1, d), eye[None])
    tilted = GMM(torch.ones(1), mu[None], cov[None])
    schedule = VPSchedule()
    x = torch.randn(5, d, dtype=torch.float64)
    tt = torch.full((5,), t, dtype=torch.float64)
    h_star = ExactTiltGuidance(prior, tilted, schedule)(x, tt, None)
    alpha, sigma = schedule.alpha(tt)[:, None], schedule.sigma(tt)[:, None]
    x0_hat = (alpha * x).view(5, *shape)
    ys = y.expand(5, 1, 2, 2)
    grad_r = reward.grad_log_tilt(x0_hat, ys).flatten(1).double()
    kappa = alpha * noise / (noise + sigma ** 2 / 4)
    torch.testing.assert_close(h_star, kappa * grad_r, rtol=1e-6, atol=1e-8)
    guidance = ConvRewardInformedGuidance(UNetBase(schedule, shape), reward, cond_channels=1, nn2_prior=True).double()
    with torch.no_grad():
        h = guidance(x.view(5, *shape), tt, x0_hat, ys)
    torch.testing.assert_close(h.flatten(1), h_star, rtol=1e-6, atol=1e-8)


def test_nn2_prior_needs_a_reward_with_a_gaussian_coefficient():
    """``nn2_prior`` with a reward that has no closed-form ``kappa`` (a classifier) is one clear error at build."""
    base = UNetBase(VPSchedule(), (1, 8, 8))
    with pytest.raises(ValueError, match="nn2_prior=true needs .*reward 'classifier' has none"):
        ConvRewardInformedGuidance(base, ClassifierReward([3]), nn2_prior=True)
