"""Tests of the image rewards: super-resolution (``iif.rewards.superres``) and the classifier
(``iif.rewards.classifier``).

References: torch.distributions.Normal(A x, sigma_y).log_prob(y) with A computed as block means by reshaping (not
average pooling), central finite differences in float64, the base class's autograd gradient, the exact Hessian
``-A^T A / sigma_y^2`` applied by the same block means, and log(sum of softmax probabilities over the class set)
from the network's float64 logits.
"""
from __future__ import annotations

import math

import pytest
import torch

from iif.conditions.measurements import Measurements
from iif.rewards.base import Reward
from iif.rewards.classifier import ClassifierReward
from iif.rewards.superres import SuperResolutionReward

DT = torch.float64


def _block_mean(x: torch.Tensor, f: int) -> torch.Tensor:
    """A x by reshaping: the mean of each f x f block, [B, C, H, W] -> [B, C, H/f, W/f]."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // f, f, w // f, f).mean(dim=(3, 5))


def _gaussian_loglik(x, y, f, sigma):
    """log N(y; A x, sigma^2 I), summed per sample, with its constant."""
    return torch.distributions.Normal(_block_mean(x, f), sigma).log_prob(y).flatten(1).sum(1)


def _fd_directional(fn, x, v, h):
    """Central finite difference of fn [B] along v: (fn(x + h v) - fn(x - h v)) / (2 h)."""
    return (fn(x + h * v) - fn(x - h * v)) / (2 * h)


def _measurement(x, f, sigma, seed):
    y = _block_mean(x, f)
    return y + sigma * torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(seed))


# ============================================================================================== super-resolution
@pytest.mark.parametrize("shape,factor", [((2, 1, 4, 4), 2), ((2, 3, 4, 4), 2), ((2, 3, 8, 4), 4)])
def test_superres_value_is_the_gaussian_loglik(shape, factor):
    """r(x | y) - (d/2) log(2 pi sigma_y^2) = log N(y; A x, sigma_y^2 I) (d = the measurement's size), and the
    reward's A is the block mean and the Measurements operator."""
    sigma = 0.05
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(shape, dtype=DT, generator=g) * 2 - 1
    y = _measurement(x0, factor, sigma, 1)
    x = x0 + 0.1 * torch.randn(shape, dtype=DT, generator=g)
    reward = SuperResolutionReward(factor=factor, sigma_y=sigma)
    d = y[0].numel()
    const = 0.5 * d * math.log(2 * math.pi * sigma ** 2)
    for z in (x0, x):
        torch.testing.assert_close(reward(z, y) - const, _gaussian_loglik(z, y, factor, sigma), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(reward.operator(x), _block_mean(x, factor), rtol=0, atol=1e-15)
    torch.testing.assert_close(reward.operator(x), Measurements(factor, sigma).operator(x), rtol=0, atol=0)
    assert reward.evals == 2 * shape[0]


@pytest.mark.parametrize("shape", [(1, 1, 4, 4), (1, 3, 4, 4), (3, 3, 4, 4)])
def test_superres_grad_vs_finite_differences(shape):
    """The closed-form gradient -A^T (A x - y) / sigma_y^2 (divided by lambda) against central differences of the
    independent log-likelihood, every coordinate, float64."""
    sigma, f, lam = 0.05, 2, 2.0
    g = torch.Generator().manual_seed(2)
    x = torch.rand(shape, dtype=DT, generator=g) * 2 - 1
    y = _measurement(torch.rand(shape, dtype=DT, generator=g) * 2 - 1, f, sigma, 3)
    reward = SuperResolutionReward(factor=f, sigma_y=sigma, temperature=lam)
    got = reward.grad_log_tilt(x, y)
    assert got.shape == x.shape and got.dtype == DT and not got.requires_grad
    h = 1e-5
    fd = torch.empty_like(x)
    for i in range(x[0].numel()):
        e = torch.zeros_like(x).flatten(1)
        e[:, i] = 1.0
        fd.flatten(1)[:, i] = _fd_directional(lambda z: _gaussian_loglik(z, y, f, sigma), x, e.view_as(x), h)
    torch.testing.assert_close(got, fd / lam, rtol=1e-6, atol=1e-6)
    assert reward.grad_evals == shape[0]


def test_superres_grad_vs_autograd_and_its_hessian():
    """The closed form equals the base class's autograd of evaluate; with x requiring grad it carries a graph whose
    derivative is the Hessian -A^T A / sigma_y^2 (A^T A v = block means of v spread back, each / f^2)."""
    sigma, f = 0.05, 2
    g = torch.Generator().manual_seed(4)
    x = torch.rand(2, 3, 4, 4, dtype=DT, generator=g) * 2 - 1
    y = _measurement(torch.rand(2, 3, 4, 4, dtype=DT, generator=g), f, sigma, 5)
    reward = SuperResolutionReward(factor=f, sigma_y=sigma)
    torch.testing.assert_close(reward._grad(x, y), Reward._grad(reward, x, y), rtol=1e-12, atol=1e-10)

    xg = x.clone().requires_grad_(True)
    grad = reward.grad_log_tilt(xg, y)
    assert grad.requires_grad
    torch.testing.assert_close(grad, Reward._grad(reward, xg, y), rtol=1e-12, atol=1e-10)  # autograd path too
    v = torch.randn(x.shape, dtype=DT, generator=g)
    (hv,) = torch.autograd.grad((grad * v).sum(), xg)
    ata_v = _block_mean(v, f).repeat_interleave(f, -2).repeat_interleave(f, -1) / f ** 2
    torch.testing.assert_close(hv, -ata_v / sigma ** 2, rtol=1e-12, atol=1e-9)
    # and the counted autograd path of the base class (log_tilt_autograd) backpropagates the closed form
    (g2,) = torch.autograd.grad(reward.log_tilt_autograd(xg, y).sum(), xg)
    torch.testing.assert_close(g2, Reward._grad(reward, x, y), rtol=1e-12, atol=1e-10)


def test_superres_errors():
    reward = SuperResolutionReward(factor=2)
    x = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match=r"needs the measurement y \[2, 1, 2, 2\].*got none"):
        reward(x)
    with pytest.raises(ValueError, match=r"measurement y \[2, 1, 2, 2\].*got \(2, 1, 4, 4\)"):
        reward(x, torch.zeros(2, 1, 4, 4))  # a full-resolution condition (factor mismatch)
    with pytest.raises(ValueError, match=r"got \(2,\)"):
        reward.grad_log_tilt(x, torch.zeros(2, dtype=torch.long))  # class labels
    with pytest.raises(ValueError, match="multiples of factor=2"):
        reward(torch.zeros(2, 1, 5, 4), torch.zeros(2, 1, 2, 2))
    with pytest.raises(ValueError, match="images"):
        reward(torch.zeros(2, 16), torch.zeros(2, 4))
    for bad in ({"factor": 0}, {"factor": 1.5}, {"sigma_y": 0.0}, {"temperature": 0.0}):
        with pytest.raises(ValueError):
            SuperResolutionReward(**bad)


def test_superres_config():
    """conf/reward/superres.yaml instantiates the reward with the Measurements defaults."""
    from pathlib import Path

    import hydra
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Path(__file__).resolve().parent.parent / "conf" / "reward" / "superres.yaml")
    reward = hydra.utils.instantiate(cfg)
    m = Measurements()
    assert isinstance(reward, SuperResolutionReward)
    assert (reward.factor, reward.sigma_y, reward.temperature) == (m.factor, m.sigma_y, 1.0)


# ============================================================================================== classifier
def _sharp_classifier(classes) -> ClassifierReward:
    """A random-weight classifier in float64 whose parameters are scaled x3, so that its log-probabilities vary
    visibly with the input (the seeded init gives gradients ~1e-3, too flat for finite differences)."""
    reward = ClassifierReward(classes=classes, in_channels=1, seed=0)
    reward.net.double()
    with torch.no_grad():
        for p in reward.net.parameters():
            p.mul_(3.0)
    return reward


def _log_prob_of_set(net, x, classes):
    """log sum_{c in S} softmax(net(x))_c, float64 throughout."""
    return torch.softmax(net(x), dim=-1)[:, classes].sum(-1).log()


@pytest.mark.parametrize("classes", [[3], [0, 2, 4, 6, 8]])
def test_classifier_value_and_grad_vs_finite_differences(classes):
    """r(x) = log sum_{c in S} p(c | x) (against softmax probabilities summed over S), and grad_log_tilt against
    central differences along random directions: of the float64 reference (tight), and of the reward itself (whose
    log-softmax runs in float32: tolerance 1e-3 of the gradient's norm at h = 1e-2)."""
    reward = _sharp_classifier(classes)
    g = torch.Generator().manual_seed(6)
    x = torch.rand(3, 1, 8, 8, dtype=DT, generator=g) * 2 - 1
    ref = lambda z: _log_prob_of_set(reward.net, z, classes)  # noqa: E731
    torch.testing.assert_close(reward(x).double(), ref(x), rtol=1e-6, atol=1e-6)
    grad = reward.grad_log_tilt(x)
    assert grad.shape == x.shape and grad.dtype == DT
    norm = grad.flatten(1).norm(dim=1)
    assert (norm > 0.05).all()
    for k in range(5):
        v = torch.randn(x.shape, dtype=DT, generator=g)
        v = v / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        an = (grad * v).flatten(1).sum(1)
        torch.testing.assert_close(an, _fd_directional(ref, x, v, 1e-5), rtol=0, atol=1e-5 * norm.min().item())
        fd = _fd_directional(lambda z: reward(z).double(), x, v, 1e-2)
        torch.testing.assert_close(an, fd, rtol=0, atol=1e-3 * norm.min().item())


def test_classifier_label_condition_grad():
    """With per-sample labels as the condition, r = log p(label | x) and its gradient follow the label."""
    reward = _sharp_classifier([0])
    g = torch.Generator().manual_seed(7)
    x = torch.rand(2, 1, 8, 8, dtype=DT, generator=g) * 2 - 1
    labels = torch.tensor([1, 7])
    want = torch.log_softmax(reward.net(x), -1)[torch.arange(2), labels]
    torch.testing.assert_close(reward(x, labels).double(), want, rtol=1e-6, atol=1e-6)
    v = torch.randn(x.shape, dtype=DT, generator=g)
    an = (reward.grad_log_tilt(x, labels) * v).flatten(1).sum(1)
    fd = _fd_directional(lambda z: torch.log_softmax(reward.net(z), -1)[torch.arange(2), labels], x, v, 1e-5)
    torch.testing.assert_close(an, fd, rtol=1e-4, atol=1e-6)


def test_classifier_is_placed_on_the_run_device_before_it_pretrains():
    """``build`` places the reward like the base model, so a classifier pretrains on the run's device (the meta
    device stands in for a GPU here), and a decoded reward places the pixel reward it wraps."""
    from iif.rewards.decoded import DecodedReward

    reward = ClassifierReward(classes=[3])
    assert reward.place(torch.device("meta")) is reward
    assert {p.device.type for p in reward.net.parameters()} == {"meta"}
    inner = ClassifierReward(classes=[3])
    decoded = DecodedReward(inner, decode=lambda z: z)
    assert decoded.place(torch.device("meta")) is decoded
    assert {p.device.type for p in inner.net.parameters()} == {"meta"}
    gmm_like = SuperResolutionReward()
    assert gmm_like.place(torch.device("meta")) is gmm_like  # no network: nothing to move, still chainable
