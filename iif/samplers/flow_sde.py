"""``flow_sde``: Euler–Maruyama of the reverse-time SDEs that have the path's marginals (docs/text-to-image-models.md
"The flow SDE"; the flow-matching form of adjoint matching's memoryless SDE, rewritten in this suite's time
``t: 1 noise -> 0 data``).

On the path ``x_t = alpha(t) x_0 + sigma(t) eps`` with forward SDE ``dx = f(t) x dt + g(t) dW``
(``f = d log alpha / dt``, ``g^2 = schedule.diffusion_sq``), score ``s = -eps / sigma`` and flow (probability-flow)
velocity ``u(x, t) = f x - g^2 s / 2``, every process

    dx = [u(x, t) - nu(t)^2 / 2 * s(x, t)] dt + nu(t) dW̄,     t decreasing,

has the marginals ``p_t`` of the path for any ``nu(t) >= 0`` (forward in ``t`` the same family reads
``dx = [u + nu^2/2 s] dt + nu dW``; its Fokker–Planck equation is the continuity equation of ``u``). ``nu = g`` is
the memoryless choice: the reverse SDE of the forward SDE, ``dx = [f x - g^2 s] dt + g dW̄`` (METHODS.md §7.4:
``sigma(t)^2 = 2 eta_t`` in the flow convention ``X_t = a_t X_1 + b_t X_0``, time ``1 - t``, noise ``X_0``; on
rectified flow ``nu^2 = 2 t / (1 - t)``). With the guidance ``h`` in score units the fine-tuned model's score is
``s + h``, and ``u`` moves with it, so ``h`` enters the drift with the weight ``(g^2 + nu^2)/2``.
"""
from __future__ import annotations

import torch

from iif.samplers.base import Kernel, Sampler
from iif.schedules.base import GaussianPath

Tensor = torch.Tensor

LAST_STEPS = ("tweedie", "noise")


def log_alpha_rate(path: GaussianPath, t: Tensor) -> Tensor:
    """``f(t) = d log alpha / dt``, the forward SDE's drift rate: ``-g^2/2`` on a variance-preserving path
    (``alpha^2 + sigma^2 = 1`` gives ``g^2 = -2 f``; on a discrete schedule the rate of the training step at ``t``),
    else ``alpha' / alpha`` from the path's derivatives."""
    if path.variance_preserving:
        return -path.diffusion_sq(t) / 2
    d_alpha, _ = path.d_alpha_sigma(t)
    return d_alpha / path.alpha(t)


class FlowSDEKernel(Kernel):
    """An affine-Gaussian step ``x_t -> x_s``: ``mu^0 = a_x x + a_eps eps``, ``Delta = shift_coef h``, std ``c``.

    Euler–Maruyama step (``dt = t - s > 0``; ``f, g^2, nu^2, sigma`` at ``t``):

    1. ``s_theta = -eps / sigma_t``                                                  (score)
    2. ``b(x) = -f_t x + (g_t^2 + nu_t^2)/2 * s_theta``  (reverse-time drift ``-(u - nu^2/2 s)``)
    3. ``mu^0 = x + b(x) dt``: ``a_x = 1 - f_t dt``, ``a_eps = -(g_t^2 + nu_t^2) dt / (2 sigma_t)``
    4. ``Delta = shift_coef h``, ``shift_coef = (g_t^2 + nu_t^2) dt / 2 = -sigma_t a_eps``   (score ``s_theta + h``)
    5. ``c = nu_t sqrt(dt)``;  ``x_s = mu^0 + Delta + c z``

    The last step (to ``s = 0``) is Tweedie's denoising ``x_0 = x0_hat(x_t, t) = (x_t - sigma_t eps)/alpha_t``
    (``a_x = 1/alpha_t``, ``a_eps = -sigma_t/alpha_t``, ``c = 0``), deterministic and unguided, as DDIM's last step
    (on rectified flow it is also the flow's Euler step ``x_t - t u``).

    Attributes:
        a_x, a_eps: the mean's coefficients; t, s, var, std, shift_coef, guided: see :class:`Kernel`.
    """

    def __init__(self, t: float, s: float, a_x: float, a_eps: float, std: float, shift_coef: float, guided: bool):
        self.t, self.s, self.a_x, self.a_eps = t, s, a_x, a_eps
        self.std, self.var = std, std ** 2
        self.shift_coef, self.guided = shift_coef, guided

    def base_mean(self, x: Tensor, eps: Tensor) -> Tensor:
        return self.a_x * x + self.a_eps * eps


class FlowSDESampler(Sampler):
    """Euler–Maruyama of the reverse-time SDE with the path's marginals and noise ``nu(t) = noise_scale * g(t)``, on
    the base's grid ``base.schedule.grid(N, spacing)`` (rectified flow: with its time ``shift``, e.g. SD3's), for any
    Gaussian path (kernels :class:`FlowSDEKernel`).

    Every step but the last is a non-degenerate Gaussian (per-step log-probs, the log-RND of docs/methods.md §2.3);
    the last, to ``t = 0``, is the base's Tweedie step, unguided. ``noise_scale = 1`` (memoryless) is the reverse SDE
    of the forward one, the noise level adjoint matching needs; on a VP path one step of it is DDPM's ancestral step
    to first order in ``dt``. The discretisation error is the Euler–Maruyama one: on rectified flow the drift has a
    ``1/(1 - t)`` singularity at the start ``t_max`` and the first steps are crude, which the memoryless SDE forgets
    (its noise dominates there); with ``noise_scale < 1`` it forgets less and needs more steps (docs/
    text-to-image-models.md measures it on Gaussian data).

    Args:
        n_steps: ``N``.
        noise_scale: ``nu(t) / g(t)`` (> 0; 1: ``diffusion: memoryless``).
        spacing: timestep spacing on a discrete schedule (``leading``, ``trailing``, ``linspace``); continuous paths
            ignore it.
        steps_offset: added to ``leading`` timesteps on a discrete schedule (Stable Diffusion's scheduler uses 1).
        last_step: ``tweedie`` (default) or ``noise``: the Euler–Maruyama step to ``t = 0`` like every other, so that
            every kernel is stochastic and path densities exist (``sampler=em``; the path works of
            ``iif.metrics.works`` need it).
    """

    def __init__(self, n_steps: int = 50, noise_scale: float = 1.0, spacing: str = "leading", steps_offset: int = 0,
                 last_step: str = "tweedie"):
        if last_step not in LAST_STEPS:
            raise ValueError(f"sampler.last_step must be one of {', '.join(LAST_STEPS)}, got '{last_step}'")
        if n_steps < 2 and last_step == "tweedie":
            raise ValueError(f"sampler.n_steps must be >= 2 with last_step=tweedie (the last step is deterministic), "
                             f"got {n_steps}")
        self.last_step = last_step
        if not noise_scale > 0:
            raise ValueError(f"sampler.noise_scale must be > 0 (1: memoryless), got {noise_scale}")
        self.n_steps, self.noise_scale, self.spacing = int(n_steps), float(noise_scale), spacing
        self.steps_offset = int(steps_offset)

    def kernels(self, base) -> list[FlowSDEKernel]:
        """The ``N`` steps ``t_k -> t_{k-1}``, ``k = N..1`` (float64 coefficients)."""
        path = base.schedule
        if path.point_start:
            raise ValueError(f"sampler=flow_sde cannot start at the point start of {path!r}: use sampler=brownian")
        extra = {"steps_offset": self.steps_offset} if self.steps_offset else {}
        grid = path.grid(self.n_steps, self.spacing, **extra)
        t, s = grid[1:], grid[:-1]
        dt = t - s
        alpha, sigma = path.alpha(t), path.sigma(t)
        g2 = path.diffusion_sq(t)
        nu2 = self.noise_scale ** 2 * g2
        f = log_alpha_rate(path, t)
        # 1.-5. Euler–Maruyama; index 0 (the step to s = 0): Tweedie, unless last_step=noise
        a_x, a_eps = 1 - f * dt, -(g2 + nu2) * dt / (2 * sigma)
        std = (nu2 * dt).sqrt()
        shift = -sigma * a_eps
        tweedie = self.last_step == "tweedie"
        if tweedie:
            a_x[0], a_eps[0] = 1 / alpha[0], -sigma[0] / alpha[0]
            std[0] = 0.0
        return [FlowSDEKernel(float(t[i]), float(s[i]), float(a_x[i]), float(a_eps[i]), float(std[i]),
                              float(shift[i]), guided=i > 0 or not tweedie) for i in range(self.n_steps - 1, -1, -1)]
