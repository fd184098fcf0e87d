"""``brownian``: the Brownian base's own chain (adjoint sampling's reference process, docs/tilting.md §1): from the
point ``x_N = 0``, ``x_s = x_t + Delta + sqrt(nu(s) - nu(t)) z`` on the uniform grid, guided in score units."""
from __future__ import annotations

import torch

from iif.samplers.base import Kernel, Sampler

Tensor = torch.Tensor


class BrownianKernel(Kernel):
    """The step ``x_t -> x_s`` (``s < t``; generative time advances by ``t - s``) of ``dX = sigma_B dB``:

    1. ``mu^0(x) = x``                       (zero drift: the base needs no network)
    2. ``c^2 = nu(s) - nu(t)``               (``int sigma_B^2`` over the step: the increment's exact variance)
    3. ``Delta = c^2 h``                     (the guided SDE ``dX = sigma_B^2 h dtau + sigma_B dB``; adjoint sampling's
       control ``u = sigma_B h``)

    Its noising kernel (the backward Brownian bridge) is the path's own transition (``Kernel.noising``), degenerate
    into the point start at ``t = 1``.
    """

    def __init__(self, t: float, s: float, var: float):
        self.t, self.s = t, s
        self.var = var
        self.std = self.var ** 0.5
        self.shift_coef = self.var

    def base_mean(self, x: Tensor, eps: Tensor) -> Tensor:
        return x


class BrownianSampler(Sampler):
    """Euler–Maruyama of Brownian motion from 0 (exact in law: the increments are Gaussian), ``N`` uniform steps, on
    the Brownian base (``base_model=brownian``) only: with zero drift the chain is that base's and no other's.

    Args:
        n_steps: ``N``.
    """

    def __init__(self, n_steps: int = 100):
        if n_steps < 1:
            raise ValueError(f"sampler.n_steps must be >= 1, got {n_steps}")
        self.n_steps = int(n_steps)

    def kernels(self, base) -> list[BrownianKernel]:
        path = base.schedule
        if not path.point_start or not hasattr(path, "nu"):
            raise ValueError(f"sampler=brownian is the chain of the Brownian base (base_model=brownian); the base "
                             f"model's path is {path!r}")
        t = path.grid(self.n_steps)
        nu = path.nu(t)
        return [BrownianKernel(float(t[k]), float(t[k - 1]), float(nu[k - 1] - nu[k]))
                for k in range(self.n_steps, 0, -1)]
