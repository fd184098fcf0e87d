"""Tests of the toy metrics (``iif.metrics.toy``).

References: brute-force loops for nearest modes, histograms and the energy distance (U-statistics inside each
sample), scipy.stats.energy_distance (1-D, V-statistic CDF form) and the closed form of the energy distance
between two 1-D normals with equal variance.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from iif.gmm import GMM
from iif.metrics.toy import energy_distance, mode_histogram, mode_tv
from iif.rewards.gmm import GMMReward
from iif.targets import TiltedGMMTarget

DT = torch.float64


def _toy_target(lam: float = 1.0) -> TiltedGMMTarget:
    prior = GMM.grid([-4, -2, 0, 2, 4], var=0.1)
    reward = GMMReward([[2.0, 2.0], [2.0, -2.0], [-2.0, 2.0], [-2.0, -2.0]],
                       torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=DT), var=1.0, temperature=lam)
    return TiltedGMMTarget(prior, reward)


def _hist_by_hand(x: torch.Tensor, means: torch.Tensor) -> np.ndarray:
    """Fraction of points whose closest mean (explicit loop over means, squared distances) is each mean."""
    xn, mn = x.numpy(), means.numpy()
    counts = np.zeros(len(mn))
    for p in xn:
        counts[int(np.argmin([((p - m) ** 2).sum() for m in mn]))] += 1
    return counts / len(xn)


def _energy_by_hand(x: np.ndarray, y: np.ndarray) -> float:
    """2 E|X-Y| - E|X-X'| - E|Y-Y'| with U-statistics (i != j) inside each sample, by explicit loops."""
    n, m = len(x), len(y)
    xy = sum(np.linalg.norm(a - b) for a in x for b in y) / (n * m)
    xx = sum(np.linalg.norm(x[i] - x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(np.linalg.norm(y[i] - y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    return 2 * xy - xx - yy


# ============================================================================================== mode metrics
def test_mode_histogram_and_tv_by_hand():
    """mode_histogram equals the nearest-mean histogram computed with an explicit loop, and mode_tv equals
    1/2 sum_i |hist_i - mode_weights_i| computed by hand from that histogram."""
    target = _toy_target()
    x = 10 * torch.rand(500, 2, dtype=DT, generator=torch.Generator().manual_seed(0)) - 5
    hist = _hist_by_hand(x, target.prior.means)
    got = mode_histogram(x, target)
    assert got.shape == (25,)
    np.testing.assert_allclose(got.numpy(), hist, rtol=0, atol=1e-15)
    assert mode_tv(x, target) == pytest.approx(0.5 * np.abs(hist - target.mode_weights.numpy()).sum(), abs=1e-14)


def test_mode_tv_small_for_target_large_for_prior():
    """Exact target samples (n = 20000): mode_tv is small, below the sampling-noise bound
    E[TV] <= 1/2 sum_i sqrt(p_i (1 - p_i) / n) plus 0.01 for modes' tails crossing cell boundaries.
    Prior samples: mode_tv equals the TV between the uniform histogram 1/25 and the mode masses, computed by hand
    (to within the same noise bound), which is large for this reward."""
    target = _toy_target()
    n = 20_000
    p = target.mode_weights.numpy()
    noise = 0.5 * np.sqrt(p * (1 - p) / n).sum() * 3 + 0.01
    x_t = target.sample(n, generator=torch.Generator().manual_seed(1))
    tv_t = mode_tv(x_t, target)
    assert tv_t < noise
    x_p = target.prior.sample(n, generator=torch.Generator().manual_seed(2))
    tv_expected = 0.5 * np.abs(np.full(25, 1 / 25) - p).sum()
    assert tv_expected > 0.4
    assert mode_tv(x_p, target) == pytest.approx(tv_expected, abs=0.5 * np.sqrt(1 / 25 / n) * 25 * 3 + 0.01)


# ============================================================================================== energy distance
@pytest.mark.parametrize("n,m,d", [(7, 5, 3), (2, 9, 1), (12, 12, 2)])
def test_energy_distance_brute_force(n, m, d):
    """energy_distance equals the explicit double-loop U-statistic formula on small inputs (float32 input too)."""
    gen = torch.Generator().manual_seed(10 * n + m)
    x = torch.randn(n, d, dtype=DT, generator=gen)
    y = torch.randn(m, d, dtype=DT, generator=gen) + 0.7
    ref = _energy_by_hand(x.numpy(), y.numpy())
    assert energy_distance(x, y) == pytest.approx(ref, rel=1e-12, abs=1e-13)
    assert energy_distance(x.float(), y.float()) == pytest.approx(
        _energy_by_hand(x.float().double().numpy(), y.float().double().numpy()), rel=1e-6, abs=1e-6)


def test_energy_distance_matches_scipy_1d():
    """1-D: scipy.stats.energy_distance is sqrt(2 E|X-Y| - E|X-X'|_V - E|Y-Y'|_V) with V-statistics (CDF formula);
    converting the within-sample terms to U-statistics (factor n/(n-1)) must give energy_distance."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(40, 1, dtype=DT, generator=gen)
    y = 1.5 * torch.randn(30, 1, dtype=DT, generator=gen) + 0.4
    xs, ys = x[:, 0].numpy(), y[:, 0].numpy()
    n, m = len(xs), len(ys)
    xx_v = np.abs(xs[:, None] - xs[None]).mean()
    yy_v = np.abs(ys[:, None] - ys[None]).mean()
    ref = stats.energy_distance(xs, ys) ** 2 + xx_v - xx_v * n / (n - 1) + yy_v - yy_v * m / (m - 1)
    assert energy_distance(x, y) == pytest.approx(ref, rel=1e-10, abs=1e-12)


def test_energy_distance_same_law_is_near_zero():
    """Two independent samples (n = 2000) from the same 2-D law: the unbiased estimate is ~0 (degenerate U-statistic,
    fluctuations O(1/n)), and symmetric in its arguments."""
    gen = torch.Generator().manual_seed(4)
    g = GMM.grid([-2, 0, 2], var=0.2)
    x, y = g.sample(2000, generator=gen), g.sample(2000, generator=gen)
    ed = energy_distance(x, y)
    assert abs(ed) < 0.006
    assert energy_distance(y, x) == pytest.approx(ed, rel=1e-12, abs=1e-15)


def test_energy_distance_shifted_normals_closed_form():
    """N(0, 1) vs N(delta, 1) in 1-D: ED = 2 E|N(delta, 2)| - 2 E|N(0, 2)|, with
    E|N(mu, s^2)| = s sqrt(2/pi) exp(-mu^2 / (2 s^2)) + mu (1 - 2 Phi(-mu / s)). Unbiased estimator, n = m = 3000:
    within 0.05 (about 4 standard errors); positive and larger for a larger shift."""
    def e_abs(mu, s):
        return s * math.sqrt(2 / math.pi) * math.exp(-mu ** 2 / (2 * s ** 2)) + mu * (1 - 2 * stats.norm.cdf(-mu / s))

    gen = torch.Generator().manual_seed(5)
    vals = []
    for delta in [0.5, 1.0]:
        x = torch.randn(3000, 1, dtype=DT, generator=gen)
        y = torch.randn(3000, 1, dtype=DT, generator=gen) + delta
        expected = 2 * e_abs(delta, math.sqrt(2)) - 2 * e_abs(0.0, math.sqrt(2))
        ed = energy_distance(x, y)
        assert ed == pytest.approx(expected, abs=0.05)
        assert ed > 0
        vals.append(ed)
    assert vals[1] > vals[0]


def test_amortised_sc_loss_averages_over_fixed_measurements_of_test_images(fake_mnist):
    """``sc_loss_amortised`` (evaluation=posterior, n_measurements=3): the method samples 4 paths at each of 3
    measurements ``y_i = A x_i + sigma_y xi_i`` of test images (their residuals are the noise: ``sigma_y`` in size),
    and the metric is the mean of ``control_cost + ||A x_0 - y_i||^2 / (2 sigma_y^2 lambda)``, written out here for
    paths that end at ``x_0 = 0``; the same measurements at every evaluation."""
    from types import SimpleNamespace

    from iif.data.sets import MNIST
    from iif.metrics.posterior import PosteriorEvaluator
    from iif.rewards.superres import SuperResolutionReward

    data = MNIST(str(fake_mnist), size=8)
    reward = SuperResolutionReward(sigma_y=0.05, temperature=2.0)
    seen = []

    class Method:
        def sample(self, n, cond):
            seen.append(cond.clone())
            return SimpleNamespace(x0=torch.zeros(n, 1, 8, 8), cond=cond, control_cost=torch.arange(n).double(),
                                   nfe=1)

    base = SimpleNamespace(device=torch.device("cpu"), decode=lambda x: x)
    ev = PosteriorEvaluator(base, reward, data=data, n_samples=12, n_measurements=3)
    m1, m2 = ev.amortised_sc_loss(Method()), ev.amortised_sc_loss(Method())
    cond = seen[0]
    assert cond.shape == (12, 1, 4, 4) and torch.equal(seen[0], seen[1]) and m1 == m2
    ys = cond[::4]
    assert all(torch.equal(cond[4 * i:4 * i + 4], ys[i].expand(4, 1, 4, 4)) for i in range(3))
    assert len({tuple(y.flatten().tolist()) for y in ys}) == 3  # three different measurements
    images, _ = data.test()
    pooled = torch.nn.functional.avg_pool2d(images, 2)  # A of every test image; each y_i is one of them plus noise
    nearest = torch.cdist(ys.flatten(1), pooled.flatten(1)).min(1).values / (0.05 * 4)  # ||xi|| / sqrt(16)
    assert ((nearest > 0.5) & (nearest < 1.6)).all()
    expected = torch.arange(12).double() + (cond.double() ** 2).flatten(1).sum(1) / (2 * 0.05 ** 2 * 2.0)
    assert m1["sc_loss_amortised"] == pytest.approx(expected.mean().item(), rel=1e-6)
    assert m1["sc_loss_amortised_se"] == pytest.approx((expected.std() / 12 ** 0.5).item(), rel=1e-6)
    with pytest.raises(ValueError, match="must be 0 or divide evaluation.n_samples = 12, got 5"):
        PosteriorEvaluator(base, reward, data=data, n_samples=12, n_measurements=5)


def test_image_evaluator_sc_loss_is_control_cost_minus_r_over_lambda():
    """``sc_loss = E[control_cost - r/lambda]`` and ``kl_path = E[control_cost]``, written out for a stub method and
    a reward ``r(x) = -||x||^2`` at ``lambda = 2`` (a swapped sign or a missing ``1/lambda`` changes the value)."""
    from types import SimpleNamespace

    from iif.metrics.images import ImageEvaluator
    from iif.rewards.base import Reward

    class Norm(Reward):
        def evaluate(self, x, cond=None):
            return -(x ** 2).flatten(1).sum(1)

    x0 = torch.arange(8.0).view(8, 1, 1, 1)
    cost = torch.linspace(0.5, 4.0, 8).double()
    method = SimpleNamespace(sample=lambda n, cond=None: SimpleNamespace(x0=x0, cond=None, control_cost=cost, nfe=3))
    ev = ImageEvaluator(SimpleNamespace(decode=lambda x: x), Norm(temperature=2.0), n_samples=8)
    m = ev(method).metrics
    sc = cost + (x0.flatten().double() ** 2) / 2.0
    assert m["sc_loss"] == pytest.approx(sc.mean().item(), rel=1e-9)
    assert m["sc_loss_se"] == pytest.approx((sc.std() / 8 ** 0.5).item(), rel=1e-9)
    assert m["kl_path"] == pytest.approx(cost.mean().item(), rel=1e-9)
    assert m["reward_mean"] == pytest.approx(-(x0.flatten() ** 2).mean().item(), rel=1e-9)
