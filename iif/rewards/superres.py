"""``superres``: the reward of super-resolution as an inverse problem, the Gaussian log-likelihood of a low-resolution
measurement ``y = A x_0 + sigma_y eps`` (``A``: ``factor x factor`` average pooling), so that with ``lambda = 1`` the
tilted target ``p(x) exp(r(x | y))`` is the posterior ``p(x | y)``. ``y`` is the per-sample condition drawn by
:class:`iif.conditions.measurements.Measurements` (``conditions=measurements``, with the same ``factor`` and
``sigma_y``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from iif.rewards.base import Reward

Tensor = torch.Tensor


class SuperResolutionReward(Reward):
    """``r(x | y) = -||A x - y||^2 / (2 sigma_y^2)`` (the log-density of ``N(A x, sigma_y^2 I)`` at ``y`` without
    its constant), ``grad_x r = -A^T (A x - y) / sigma_y^2``.

    ``A x`` averages each ``factor x factor`` block, so ``A^T`` spreads each value ``/ factor^2`` over its block.

    Args:
        factor: the pooling factor (``[C, H, W] -> [C, H/factor, W/factor]``; ``H, W`` multiples of it).
        sigma_y: the measurement noise on the data's ``[-1, 1]`` scale.
        temperature: ``lambda``.
        name: shown in error messages.
    """

    def __init__(self, factor: int = 2, sigma_y: float = 0.05, temperature: float = 1.0, name: str = "superres"):
        super().__init__(temperature=temperature, name=name)
        if int(factor) != factor or factor < 1 or not sigma_y > 0:
            raise ValueError(f"reward.factor must be an integer >= 1 and sigma_y > 0, got {factor}, {sigma_y}")
        self.factor, self.sigma_y = int(factor), float(sigma_y)

    def operator(self, x: Tensor) -> Tensor:
        """``A x``: ``[B, C, H, W] -> [B, C, H/f, W/f]`` (the operator of ``Measurements``)."""
        return F.avg_pool2d(x, self.factor)

    def adjoint(self, v: Tensor) -> Tensor:
        """``A^T v``: ``[B, C, H/f, W/f] -> [B, C, H, W]``, each value ``/ f^2`` on its ``f x f`` block."""
        f = self.factor
        return v.repeat_interleave(f, dim=-2).repeat_interleave(f, dim=-1) / f ** 2

    def _residual(self, x: Tensor, cond: Tensor | None) -> Tensor:
        """``A x - y`` ``[B, C, H/f, W/f]``, after checking ``x`` and the measurement ``y = cond``."""
        f = self.factor
        if x.dim() != 4 or x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"reward '{self.name}': samples must be images [B, C, H, W] with H and W multiples of "
                             f"factor={f}, got {tuple(x.shape)}")
        want = (x.shape[0], x.shape[1], x.shape[2] // f, x.shape[3] // f)
        if cond is None:
            raise ValueError(f"reward '{self.name}' needs the measurement y {list(want)} as the samples' condition "
                             f"(conditions=measurements), got none")
        if tuple(cond.shape) != want:
            raise ValueError(f"reward '{self.name}': the condition must be the measurement y {list(want)} "
                             f"(x {tuple(x.shape)} pooled by factor={f}), got {tuple(cond.shape)}; are "
                             f"conditions=measurements and its factor the reward's?")
        return self.operator(x) - cond.to(x.dtype)

    def evaluate(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        """``x [B, C, H, W]``, ``y = cond [B, C, H/f, W/f]`` -> ``[B]``."""
        res = self._residual(x, cond)
        return -res.square().flatten(1).sum(1) / (2 * self.sigma_y ** 2)

    def _grad(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        """``-A^T (A x - y) / sigma_y^2`` ``[B, C, H, W]``; torch ops throughout, so it carries a graph to ``x`` when
        ``x`` requires grad (the Hessian ``-A^T A / sigma_y^2`` for the pathwise method)."""
        return -self.adjoint(self._residual(x, cond)) / self.sigma_y ** 2

    def gaussian_kappa(self, alpha: Tensor, sigma: Tensor) -> Tensor:
        """``kappa = alpha lambda sigma_y^2 / (lambda sigma_y^2 + sigma^2 / f^2)``, the coefficient of the Gaussian
        base's optimal h: for ``X_0 ~ N(0, I)`` on the path ``x_t = alpha x_0 + sigma eps`` (``alpha^2 + sigma^2 =
        1``), and this reward at temperature ``lambda``, ``h*(x_t) = grad log E[exp(r(X_0 | y) / lambda) | x_t]`` is
        exactly ``kappa(t) grad_x (r / lambda)(x0_hat | y)`` at ``x0_hat = alpha x_t`` (docs/images.md, "The size of
        NN2": ``A X_0 | x_t ~ N(A x0_hat, sigma^2 A A^T)`` and ``A A^T = I / f^2`` for ``f x f`` average pooling).
        ``alpha, sigma [B]`` -> ``[B]``."""
        noise = self.temperature * self.sigma_y ** 2
        return alpha * noise / (noise + sigma ** 2 / self.factor ** 2)
