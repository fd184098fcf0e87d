"""``fid``: the Fréchet distance between two image sets in the feature space of a custom extractor (e.g. the
penultimate layer :meth:`iif.rewards.classifier.SmallCNN.features` of the reward classifier), the FID of a small
domain where Inception features are meaningless (MNIST-sized, 1-channel, ``[-1, 1]``-scaled images).

The distance itself is torchmetrics' (``FrechetInceptionDistance`` with a custom ``feature`` module), so that the
number is the one the literature's tooling computes; this module only adapts the extractor and checks the inputs:

* a custom module receives the images *unchanged* (torchmetrics casts to uint8 / rescales only for its own
  Inception network; ``normalize`` merely picks the dtype of a probe image, which is not used when the module has
  ``num_features``), so float images in ``[-1, 1]`` with any channel count work;
* features are cast to float64 before torchmetrics accumulates them (it keeps float64 sums but casts the result back
  to the features' dtype), so the statistics and the result are float64;
* torchmetrics syncs its states across processes on ``compute`` by default, which would hang a distributed run that
  evaluates on one rank; it is switched off here (the distance is of the sets given to this process).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

Tensor = torch.Tensor
FeatureFn = Callable[[Tensor], Tensor]


class _Features(nn.Module):
    """``feature_fn`` as the ``nn.Module`` torchmetrics expects: ``[B, ...] -> [B, num_features]`` float64 (on CPU,
    where the metric's states live), with the feature dimension checked against the reference set's."""

    def __init__(self, feature_fn: FeatureFn, num_features: int):
        super().__init__()
        self.feature_fn = feature_fn
        self.num_features = int(num_features)  # read by torchmetrics (an int: no probe image)
        self.which = "reference"  # the set being featurised, for error messages

    def forward(self, x: Tensor) -> Tensor:
        f = self.feature_fn(x)
        if f.dim() != 2 or f.shape != (x.shape[0], self.num_features):
            raise ValueError(f"FID: feature_fn maps the {self.which} images {tuple(x.shape)} to features "
                             f"{tuple(f.shape)}, expected [{x.shape[0]}, {self.num_features}] (the feature dimension "
                             f"of the reference set); do the two sets have the same image shape?")
        return f.detach().double().cpu()


def _check_set(x: Tensor, which: str) -> None:
    if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[0] < 2:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"FID needs at least 2 images in the {which} set (a covariance), got {shape}")


class FeatureFID:
    """The Fréchet distance of sample sets to one reference set, whose feature statistics are computed once.

    ``FID = ||mu_r - mu_s||^2 + tr(S_r + S_s - 2 (S_r S_s)^{1/2})`` with ``mu, S`` the mean and (unbiased) covariance
    of ``feature_fn`` over each set (torchmetrics' ``FrechetInceptionDistance``, ``reset_real_features=False``).

    Args:
        feature_fn: images ``[B, ...] -> [B, d]`` (called without gradients, in batches).
        real: the reference images ``[N, ...]``, ``N >= 2``.
        batch_size: images per ``feature_fn`` call.

    Attributes:
        num_features: ``d``; n_real: ``N``.
    """

    def __init__(self, feature_fn: FeatureFn, real: Tensor, batch_size: int = 256):
        from torchmetrics.image.fid import FrechetInceptionDistance

        if batch_size < 1:
            raise ValueError(f"FID batch_size must be >= 1, got {batch_size}")
        _check_set(real, "reference")
        self.batch_size = int(batch_size)
        with torch.no_grad():
            probe = feature_fn(real[:2])
        if probe.dim() != 2 or probe.shape[0] != 2:
            raise ValueError(f"FID: feature_fn must map images [B, ...] to features [B, d], got "
                             f"{tuple(real[:2].shape)} -> {tuple(probe.shape)}")
        self._features = _Features(feature_fn, probe.shape[1])
        self.num_features, self.n_real = self._features.num_features, int(real.shape[0])
        self._metric = FrechetInceptionDistance(feature=self._features, reset_real_features=False, normalize=True,
                                                sync_on_compute=False)
        self._update(real, real=True)

    def _update(self, x: Tensor, real: bool) -> None:
        self._features.which = "reference" if real else "sample"
        for i in range(0, x.shape[0], self.batch_size):
            self._metric.update(x[i:i + self.batch_size], real=real)

    def __call__(self, fake: Tensor) -> float:
        """The Fréchet distance of the samples ``fake [M, ...]`` (``M >= 2``) to the reference set (float64)."""
        _check_set(fake, "sample")
        self._metric.reset()  # drops the previous sample set only
        self._update(fake, real=False)
        return float(self._metric.compute())


def frechet_distance(feature_fn: FeatureFn, real: Tensor, fake: Tensor, batch_size: int = 256) -> float:
    """The Fréchet distance between ``real [N, ...]`` and ``fake [M, ...]`` (``N, M >= 2``) in the features of
    ``feature_fn: [B, ...] -> [B, d]``: ``||mu_r - mu_f||^2 + tr(S_r + S_f - 2 (S_r S_f)^{1/2})``, float64.

    For several sample sets against one reference set, :class:`FeatureFID` featurises the reference once.
    """
    _check_set(fake, "sample")
    return FeatureFID(feature_fn, real, batch_size)(fake)
