"""``measurements``: simulated measurements ``y = A x_0 + sigma_y eps`` of clean samples, the condition of an
amortised h-transform for an inverse problem (IIF paper Sec. 4.2: ``y`` is an input of ``h``, and training draws
``y`` from the model of the measurement). ``A`` is ``factor x factor`` average pooling (super-resolution)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from iif.conditions.base import ConditionSource

Tensor = torch.Tensor


class Measurements(ConditionSource):
    """``y ~ N(A x_0, sigma_y^2 I)`` with ``x_0`` drawn from the frozen base model (its unguided sampler).

    The clean samples cost base-network evaluations, counted in the run's budget like any others.

    Args:
        factor: the pooling factor of ``A`` (``[C, H, W] -> [C, H/factor, W/factor]``).
        sigma_y: the measurement noise (on the data's ``[-1, 1]`` scale).
    """

    def __init__(self, factor: int = 2, sigma_y: float = 0.05):
        if factor < 1 or sigma_y <= 0:
            raise ValueError(f"conditions.factor must be >= 1 and sigma_y > 0, got {factor}, {sigma_y}")
        self.factor, self.sigma_y = int(factor), float(sigma_y)
        self.base = self.sampler = None

    def bind(self, base, sampler) -> None:
        self.base, self.sampler = base, sampler

    def operator(self, x: Tensor) -> Tensor:
        """``A x``: ``[B, C, H, W] -> [B, C, H/factor, W/factor]``."""
        return F.avg_pool2d(x, self.factor)

    def feature_dim(self, sample_shape: tuple[int, ...]) -> int:
        """``C (H // factor) (W // factor)`` for samples ``(C, H, W)``: the size of a measurement."""
        c, h, w = sample_shape
        return c * (h // self.factor) * (w // self.factor)

    def features(self, cond: Tensor) -> Tensor:
        """``[B, C (H/factor) (W/factor)]``: the flattened measurements ``y`` (float32, on ``cond``'s device)."""
        return cond.flatten(1).float()

    def sample(self, n: int) -> Tensor:
        if self.sampler is None:
            raise RuntimeError("Measurements.bind(base, sampler) must be called before sampling (iif.build does)")
        return self.measure(self.sampler.sample(self.base, None, n).x0)

    def measure(self, x0: Tensor) -> Tensor:
        """``y = A x_0 + sigma_y xi``, ``xi ~ N(0, I)``: ``[B, C, H, W] -> [B, C, H/factor, W/factor]``."""
        y = self.operator(x0)
        return y + self.sigma_y * torch.randn_like(y)

    def base_pairs(self, n: int, draw) -> tuple[Tensor, Tensor]:
        """Base samples first, each with its own measurement ``y = A x_0 + sigma_y xi``: ``(x_0, y)`` is a draw of
        the joint ``p(x_0) p(y | x_0)``, so ``x_0 | y`` follows the posterior ``p(x_0 | y)``, the tilted target of
        the super-resolution reward at ``lambda = 1`` (docs/images.md). A base sample with an independent ``y``
        (the default pairing) would be ``x_0 ⊥ y``, a buffer that teaches ``h`` to ignore ``y``."""
        x0 = draw(None)
        return x0, self.measure(x0)
