"""``ddpm``: ancestral DDPM sampling of a variance-preserving path (docs/methods.md §0.2, "Reverse kernels")."""
from __future__ import annotations

import torch

from iif.samplers.base import Kernel, Sampler, log_rnd_increment, rnd_step, stl_step  # noqa: F401 (re-exported)

Tensor = torch.Tensor

LAST_STEPS = ("noise", "noiseless")


class DDPMKernel(Kernel):
    """The DDPM reverse step ``x_k -> x_{k-1}`` between grid times ``t_k > t_{k-1}``:

    1. ``alpha_k = alphabar(t_k) / alphabar(t_{k-1})``, ``beta_k = 1 - alpha_k``
    2. ``mu^0_k(x) = (x - beta_k / sqrt(1 - alphabar_k) * eps) / sqrt(alpha_k)``
    3. ``Delta_k = beta_k / sqrt(alpha_k) * h``      (score-unit guidance [IIF 30])
    4. ``c_k^2 = beta_k``                             (every step, the last included: §2.4 option (a))

    Attributes:
        k: step index (``N..1``); alpha, beta, abar: ``alpha_k, beta_k, alphabar_k``; sigma: ``sqrt(beta_k)``.
    """

    def __init__(self, k: int, t: float, s: float, alpha: float, beta: float, abar: float, noiseless: bool = False):
        self.k, self.t, self.s, self.alpha, self.beta, self.abar = k, t, s, alpha, beta, abar
        self.shift_coef = beta / alpha ** 0.5
        self.sigma = beta ** 0.5
        self.var, self.std, self.guided = (0.0, 0.0, False) if noiseless else (beta, self.sigma, True)

    def base_mean(self, x: Tensor, eps: Tensor) -> Tensor:
        return (x - self.beta / (1 - self.abar) ** 0.5 * eps) / self.alpha ** 0.5


class DDPMSampler(Sampler):
    """Ancestral DDPM sampler on the base's variance-preserving path (Algorithm 1 step 1), kernels
    :class:`DDPMKernel` on the grid ``base.schedule.grid(N, spacing)`` (``k / N`` on a continuous path).

    ``sigma_t^2 = beta_t`` on every step, so every kernel is non-degenerate and the RND is finite (§2.4 option (a)).
    The last step's noise ``sqrt(beta_1) z`` adds ``beta_1`` to the samples' variance (on the toy, 100 steps:
    ``beta_1 = 0.002``; the exact base's within-mode variance per coordinate is 0.110 with it and 0.108 without, against
    the data's 0.100: the rest is the discretisation); ``last_step="noiseless"`` ends with the base's Tweedie denoising
    ``x_0 = mu^0_1(x_1) = x0_hat(x_1, t_1)`` instead, unguided (a deterministic guided step would have no density),
    which keeps the RND of the steps before it exact. diffusers' ``DDPMScheduler`` adds no noise at its last step.

    Args:
        n_steps: number of steps N.
        spacing: timestep spacing on a discrete schedule (diffusers' ``leading``, ``trailing``, ``linspace``).
        last_step: ``noise`` (default) or ``noiseless``.
    """

    def __init__(self, n_steps: int = 100, spacing: str = "leading", last_step: str = "noise"):
        if n_steps < 1:
            raise ValueError(f"sampler.n_steps must be >= 1, got {n_steps}")
        if last_step not in LAST_STEPS:
            raise ValueError(f"sampler.last_step must be one of {', '.join(LAST_STEPS)}, got '{last_step}'")
        self.n_steps, self.spacing, self.last_step = int(n_steps), spacing, last_step

    def kernels(self, base) -> list[DDPMKernel]:
        """The ``N`` reverse steps ``k = N..1``."""
        path = base.schedule
        if not path.variance_preserving:
            raise ValueError(f"sampler 'ddpm' needs a variance-preserving path; base model's is {path!r} "
                             "(use sampler=ddim)")
        t = path.grid(self.n_steps, self.spacing)
        abar = path.alphabar(t)
        alpha = torch.ones_like(abar)
        alpha[1:] = abar[1:] / abar[:-1]
        return [DDPMKernel(k, float(t[k]), float(t[k - 1]), float(alpha[k]), float(1 - alpha[k]), float(abar[k]),
                           noiseless=(k == 1 and self.last_step == "noiseless"))
                for k in range(self.n_steps, 0, -1)]
