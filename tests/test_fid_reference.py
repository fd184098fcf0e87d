"""Tests of the feature-space Fréchet distance (``iif.metrics.fid``) and the SNIS reference (``iif.metrics.snis``).

References: the closed form of the Fréchet distance between two Gaussians from their TRUE parameters (scipy's
matrix square root), a numpy/scipy Fréchet distance of empirical moments, and the closed forms of a linear tilt of
N(0, 1): target N(a, 1), log Z = a^2/2, P_target(x > 0) = Phi(a), ESS/N -> exp(-a^2), and the asymptotic standard
error of the SNIS mean sqrt(exp(a^2) (1 + a^2) / N).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from iif.metrics.fid import FeatureFID, frechet_distance
from iif.metrics.snis import snis_reference

DT = torch.float64


def _frechet_closed_form(mu1, s1, mu2, s2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^{1/2} S2 S1^{1/2})^{1/2}) with scipy's sqrtm (numpy arrays)."""
    r1 = scipy.linalg.sqrtm(s1)
    cross = scipy.linalg.sqrtm(r1 @ s2 @ r1)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * cross).real)


def _identity(z: torch.Tensor) -> torch.Tensor:
    return z


# ============================================================================================== FID
def test_fid_identical_sets_is_zero():
    """The distance of a set to itself is 0 up to round-off (relative to the features' scale tr S)."""
    x = 3.0 + 2.0 * torch.randn(500, 5, dtype=DT, generator=torch.Generator().manual_seed(0))
    scale = float(torch.cov(x.T).trace())
    assert abs(frechet_distance(_identity, x, x)) < 1e-3 * scale
    assert abs(frechet_distance(_identity, x, x.flip(0), batch_size=7)) < 1e-3 * scale  # order, batching


def test_fid_two_gaussians_closed_form():
    """20000 samples of N(mu1, S1) and N(mu2, S2) in d = 3 (identity features) against the closed form from the true
    parameters. Monte-Carlo sd of the estimate, measured over 40 seeds: 0.035; tolerance 5 sd."""
    g = torch.Generator().manual_seed(1)
    a1 = torch.tensor([[1.0, 0.3, 0.0], [0.0, 0.8, 0.2], [0.1, 0.0, 0.6]], dtype=DT)
    a2 = torch.tensor([[0.5, 0.0, 0.2], [0.3, 1.2, 0.0], [0.0, -0.4, 0.9]], dtype=DT)
    mu1, mu2 = torch.tensor([0.0, 0.5, -1.0], dtype=DT), torch.tensor([1.0, -0.5, 0.25], dtype=DT)
    x = mu1 + torch.randn(20000, 3, dtype=DT, generator=g) @ a1.T  # cov a1 a1^T
    y = mu2 + torch.randn(20000, 3, dtype=DT, generator=g) @ a2.T
    want = _frechet_closed_form(mu1.numpy(), (a1 @ a1.T).numpy(), mu2.numpy(), (a2 @ a2.T).numpy())
    got = frechet_distance(_identity, x, y)
    assert isinstance(got, float)
    assert got == pytest.approx(want, abs=5 * 0.035)
    assert frechet_distance(_identity, y, x) == pytest.approx(got, rel=1e-9)  # symmetric


def test_fid_images_float32_one_channel_vs_numpy():
    """float32 images in [-1, 1] with 1 channel (no uint8/3-channel conversion happens) and a flattening extractor:
    the distance equals scipy's Fréchet distance of the empirical means and unbiased covariances (float64)."""
    g = torch.Generator().manual_seed(2)
    real = torch.rand(300, 1, 2, 2, generator=g) * 2 - 1
    fake = (torch.rand(200, 1, 2, 2, generator=g) * 1.5 - 0.5).clamp(-1, 1)
    flat = lambda z: z.flatten(1)  # noqa: E731
    fr, ff = real.flatten(1).double().numpy(), fake.flatten(1).double().numpy()
    want = _frechet_closed_form(fr.mean(0), np.cov(fr.T), ff.mean(0), np.cov(ff.T))
    assert frechet_distance(flat, real, fake, batch_size=64) == pytest.approx(want, rel=1e-8)


def test_feature_fid_reuse_matches_one_shot():
    """FeatureFID featurises the reference set once and gives the one-shot value for each of several sample sets,
    in any order and repeated."""
    g = torch.Generator().manual_seed(3)
    real = torch.randn(400, 4, dtype=DT, generator=g)
    fakes = [torch.randn(300, 4, dtype=DT, generator=g) * s + m for s, m in ((1.0, 0.0), (0.5, 1.0), (2.0, -1.0))]
    calls = []

    def counting(z):
        calls.append(z.shape[0])
        return z

    ref = FeatureFID(counting, real, batch_size=128)
    n_ref_calls = len(calls)
    got = [ref(f) for f in fakes] + [ref(fakes[0])]
    assert ref.num_features == 4 and ref.n_real == 400
    for f, v in zip(fakes + fakes[:1], got):
        assert v == pytest.approx(frechet_distance(_identity, real, f), rel=1e-10, abs=1e-12)
    assert got[0] < got[1] and got[0] < got[2]
    assert len(calls) == n_ref_calls + 3 * 3 + 3  # the reference set is not featurised again (300/128 -> 3 calls)


def test_fid_with_classifier_features():
    """SmallCNN.features on 1-channel [-1, 1] images: 0 for identical sets, positive for shifted ones."""
    from iif.rewards.classifier import SmallCNN

    net = SmallCNN(in_channels=1).eval()
    g = torch.Generator().manual_seed(4)
    real = torch.rand(400, 1, 8, 8, generator=g) * 2 - 1  # more images than the 128 feature dimensions
    ref = FeatureFID(net.features, real, batch_size=100)
    same = abs(ref(real))
    assert same < 1e-9
    assert ref((real + 0.5).clamp(-1, 1)) > 1000 * max(same, 1e-12)  # random features vary little: a relative bound


def test_fid_errors():
    x = torch.randn(10, 3)
    with pytest.raises(ValueError, match="at least 2 images in the sample set"):
        frechet_distance(_identity, x, x[:1])
    with pytest.raises(ValueError, match="at least 2 images in the reference set"):
        FeatureFID(_identity, x[:1])
    with pytest.raises(ValueError, match=r"features \(5, 6\), expected \[5, 3\]"):
        frechet_distance(lambda z: z.flatten(1), x, torch.randn(5, 2, 3))
    with pytest.raises(ValueError, match=r"features \[B, d\]"):
        frechet_distance(lambda z: z.sum(1), x, x)


# ============================================================================================== SNIS
@pytest.mark.parametrize("a", [0.5, 1.0])
def test_snis_linear_tilt_of_a_gaussian(a):
    """x ~ N(0, 1), log w = a x: the target is N(a, 1), log Z = a^2/2, E_target[x] = a, P_target(x > 0) = Phi(a),
    ESS/N -> E[w]^2 / E[w^2] = exp(-a^2), and the SNIS mean's standard error -> sqrt(exp(a^2) (1 + a^2) / N).
    Tolerances are 5 (asymptotic) standard errors of each estimate."""
    n = 200_000
    x = torch.randn(n, dtype=DT, generator=torch.Generator().manual_seed(0))
    ref = snis_reference(a * x, x, labels=(x > 0).long(), n_classes=2, n_resample=20_000,
                         generator=torch.Generator().manual_seed(1))
    se_mean = math.sqrt(math.exp(a * a) * (1 + a * a) / n)
    assert ref.n == n
    assert ref.log_z == pytest.approx(a * a / 2, abs=5 * math.sqrt(math.expm1(a * a) / n))
    assert ref.reward_mean == pytest.approx(a, abs=5 * se_mean)
    assert ref.reward_mean_se == pytest.approx(se_mean, rel=0.1)
    # ESS/N = mean(w)^2 / mean(w^2): relative sd ~ sqrt(Var(w^2)/E[w^2]^2 / N) = sqrt(expm1(4a^2) / N)
    assert ref.ess_frac == pytest.approx(math.exp(-a * a), rel=5 * math.sqrt(math.expm1(4 * a * a) / n))
    assert ref.ess == pytest.approx(ref.ess_frac * n)
    p = float(torch.distributions.Normal(0.0, 1.0).cdf(torch.tensor(a)))
    assert ref.class_fractions.shape == (2,)
    assert ref.class_fractions[1].item() == pytest.approx(p, abs=5 * math.sqrt(p * (1 - p) / ref.ess))
    assert ref.class_fractions.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert ref.weights.sum().item() == pytest.approx(1.0, abs=1e-12)
    xr = x[ref.resampled]
    assert ref.resampled.shape == (20_000,) and ref.resampled.dtype == torch.long
    assert xr.mean().item() == pytest.approx(a, abs=5 * math.sqrt(1 / 20_000 + 1 / ref.ess))
    assert xr.std().item() == pytest.approx(1.0, abs=0.05)


def test_snis_equal_weights_and_stability():
    """Equal weights (any constant, even huge): ess = N, log Z = the constant, the plain mean and its standard error
    sd/sqrt(N) (population sd), and the empirical label fractions."""
    g = torch.Generator().manual_seed(5)
    n = 1000
    r = torch.randn(n, dtype=DT, generator=g)
    labels = torch.randint(0, 4, (n,), generator=g)
    ref = snis_reference(torch.full((n,), 800.0, dtype=DT), r, labels, n_classes=5)  # exp(800) overflows float64
    assert ref.ess == pytest.approx(n, rel=1e-12)
    assert ref.ess_frac == pytest.approx(1.0, rel=1e-12)
    assert ref.log_z == pytest.approx(800.0, rel=1e-14)
    assert ref.reward_mean == pytest.approx(r.numpy().mean(), abs=1e-12)
    assert ref.reward_mean_se == pytest.approx(r.numpy().std() / math.sqrt(n), rel=1e-10)
    want = np.bincount(labels.numpy(), minlength=5) / n
    np.testing.assert_allclose(ref.class_fractions.numpy(), want, atol=1e-14)
    assert ref.class_fractions[4] == 0 and ref.resampled.numel() == 0
    # one dominant weight: ess -> 1
    assert snis_reference(torch.tensor([0.0, 0.0, 50.0]), torch.zeros(3)).ess == pytest.approx(1.0, abs=1e-12)


def test_snis_resampling_follows_the_weights_and_the_generator():
    w = torch.tensor([1.0, 3.0, 0.0, 6.0])
    log_w = torch.log(w.clamp_min(1e-300)).double()
    log_w[2] = -800.0
    draw = lambda s: snis_reference(log_w, torch.zeros(4), n_resample=50_000,  # noqa: E731
                                    generator=torch.Generator().manual_seed(s)).resampled
    idx = draw(0)
    freq = np.bincount(idx.numpy(), minlength=4) / idx.numel()
    np.testing.assert_allclose(freq, [0.1, 0.3, 0.0, 0.6], atol=0.01)
    assert torch.equal(idx, draw(0)) and not torch.equal(idx, draw(1))


def test_snis_errors():
    ok = torch.zeros(5)
    with pytest.raises(ValueError, match="N >= 2"):
        snis_reference(torch.zeros(1), torch.zeros(1))
    with pytest.raises(ValueError, match=r"shape \[N\]"):
        snis_reference(torch.zeros(5, 2), torch.zeros(5))
    with pytest.raises(ValueError, match="rewards has shape"):
        snis_reference(ok, torch.zeros(4))
    with pytest.raises(ValueError, match="log_w has 1 non-finite"):
        snis_reference(torch.tensor([0.0, float("nan"), 1.0]), torch.zeros(3))
    with pytest.raises(ValueError, match="log_w has 1 non-finite"):
        snis_reference(torch.tensor([0.0, float("inf"), 1.0]), torch.zeros(3))
    with pytest.raises(ValueError, match="rewards has 1 non-finite"):
        snis_reference(ok, torch.tensor([0.0, 0, 0, 0, float("nan")]))
    with pytest.raises(ValueError, match="labels must be integer"):
        snis_reference(ok, ok, labels=torch.zeros(5))
    with pytest.raises(ValueError, match="labels must be integer"):
        snis_reference(ok, ok, labels=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must lie in 0..2"):
        snis_reference(ok, ok, labels=torch.tensor([0, 1, 2, 3, 0]), n_classes=3)
    with pytest.raises(ValueError, match=r"labels must lie in"):
        snis_reference(ok, ok, labels=torch.tensor([0, 1, -1, 0, 0]))
    with pytest.raises(ValueError, match="n_resample"):
        snis_reference(ok, ok, n_resample=-1)
