"""``ddim``: DDIM (Song et al. 2021) on any Gaussian path, stochastic for ``eta > 0`` (docs/methods.md
"Reverse kernels"); with the same noise its steps equal ``diffusers.DDIMScheduler.step`` (tested)."""
from __future__ import annotations

import torch

from iif.samplers.base import Kernel, Sampler
from iif.schedules.base import GaussianPath

Tensor = torch.Tensor

FINAL_ALPHABARS = ("one", "midpoint")


class DDIMKernel(Kernel):
    """The DDIM step ``x_t -> x_s`` with ``a_t = alpha(t)``, ``b_t = sigma(t)``:

    1. ``c = eta * b_s * sqrt(1 - a_t^2 b_s^2 / (a_s^2 b_t^2))``    (the posterior std of ``x_s | x_t, x_0`` times ``eta``;
       VP: ``eta * sqrt((1 - abar_s)/(1 - abar_t) (1 - abar_t/abar_s))``, diffusers' ``eta * sqrt(variance)``)
    2. ``x0_hat = (x_t - b_t eps) / a_t``
    3. ``mu^0 = a_s x0_hat + sqrt(b_s^2 - c^2) eps``
    4. ``Delta = k_h h``, ``k_h = b_t (a_s b_t / a_t - sqrt(b_s^2 - c^2))``   (``eps -> eps - b_t h``)
    5. ``x_s = mu^0 + Delta + c z``
    """

    def __init__(self, t: float, s: float, a_t: float, b_t: float, a_s: float, b_s: float, eta: float):
        self.t, self.s, self.a_t, self.b_t, self.a_s, self.b_s = t, s, a_t, b_t, a_s, b_s
        ratio = (a_t * b_s) ** 2 / (a_s * b_t) ** 2
        self.var = eta ** 2 * b_s ** 2 * max(0.0, 1 - ratio)
        self.std = self.var ** 0.5
        self.direction = max(0.0, b_s ** 2 - self.var) ** 0.5
        self.shift_coef = b_t * (a_s * b_t / a_t - self.direction)
        self.guided = self.std > 0 or eta == 0  # a deterministic step of a stochastic chain is taken unguided

    def base_mean(self, x: Tensor, eps: Tensor) -> Tensor:
        return self.a_s * ((x - self.b_t * eps) / self.a_t) + self.direction * eps

    def noising(self, path) -> tuple[float, float]:
        """``a = a_t / a_s``, ``v = b_t^2 - a^2 b_s^2`` from the step's own endpoint coefficients (the last step
        may end off the path: ``final_alphabar``)."""
        a = self.a_t / self.a_s
        return a, self.b_t ** 2 - a ** 2 * self.b_s ** 2


class DDIMSampler(Sampler):
    """DDIM with ``eta in [0, 1]`` on the base's path, on ``base.schedule.grid(N, spacing)``.

    ``eta > 0``: every step but the last is a non-degenerate Gaussian (per-step log-probs, the log-RND), and the
    last step (to ``t = 0``, where ``c = 0``) is the base's deterministic step, unguided, so that the RND of the
    steps before it stays exact. ``eta = 1`` on a VP path is DDPM with the posterior variance ``beta~_t``.
    ``eta = 0``: the deterministic probability-flow sampler (guided at every step), with no path density: methods
    that need per-step kernels refuse it. On rectified flow ``eta = 0`` is the Euler step of the flow ODE.

    Args:
        n_steps: ``N``.
        eta: the noise level.
        spacing: diffusers' timestep spacing on a discrete schedule (``leading``, ``trailing``, ``linspace``).
        steps_offset: added to ``leading`` timesteps (Stable Diffusion's scheduler config uses 1).
        path: a Gaussian path whose coefficients the chain uses instead of the base's own (None: the base's). The
            network is still called at the grid's timesteps, so a discrete path must have the base's number of
            training timesteps. Adjoint matching fine-tunes Stable Diffusion on DDIM with betas 0.002..0.009
            (``sampler=ddim_am``): a more memoryless chain than the one SD was trained on (docs/methods.md §7.4).
        final_alphabar: where the last step ends: ``one`` (clean data, ``alphabar = 1``, diffusers'
            ``set_alpha_to_one``) or ``midpoint`` (``alphabar = (1 + alphabar_{t_1}) / 2``, adjoint matching's
            SD scheduler: the last step is then stochastic and guided like the others).
    """

    def __init__(self, n_steps: int = 50, eta: float = 1.0, spacing: str = "leading", steps_offset: int = 0,
                 path=None, final_alphabar: str = "one"):
        if n_steps < 1:
            raise ValueError(f"sampler.n_steps must be >= 1, got {n_steps}")
        if not 0 <= eta <= 1:
            raise ValueError(f"sampler.eta must lie in [0, 1], got {eta}")
        if final_alphabar not in FINAL_ALPHABARS:
            raise ValueError(f"sampler.final_alphabar must be one of {', '.join(FINAL_ALPHABARS)}, got "
                             f"'{final_alphabar}'")
        if path is not None and not isinstance(path, GaussianPath):
            raise ValueError(f"sampler.path must be a Gaussian path (iif.schedules), got {type(path).__name__}")
        self.n_steps, self.eta, self.spacing, self.steps_offset = int(n_steps), float(eta), spacing, int(steps_offset)
        self.own_path, self.final_alphabar = path, final_alphabar
        self.provides = frozenset({"per_step_kernels"}) if eta > 0 else frozenset()

    def path(self, base) -> GaussianPath:
        """``sampler.path`` if given (checked against the base's number of training timesteps), else the base's."""
        if self.own_path is None:
            return base.schedule
        own, theirs = getattr(self.own_path, "T", None), getattr(base.schedule, "T", None)
        if own != theirs:
            raise ValueError(f"sampler.path has {own or 'continuous'} training timesteps and the base model's "
                             f"schedule {theirs or 'continuous'}: the network's timesteps would not match the "
                             "chain's noise levels")
        return self.own_path

    def kernels(self, base) -> list[DDIMKernel]:
        path = self.path(base)
        if path.point_start:
            raise ValueError(f"sampler=ddim cannot start at the point start of {path!r}: use sampler=brownian")
        extra = {"steps_offset": self.steps_offset} if self.steps_offset else {}
        t = path.grid(self.n_steps, self.spacing, **extra)
        a, b = path.alpha(t), path.sigma(t)
        if self.final_alphabar == "midpoint":
            abar = (1 + a[1] ** 2) / 2
            a[0], b[0] = abar.sqrt(), (1 - abar).sqrt()
        return [DDIMKernel(float(t[k]), float(t[k - 1]), float(a[k]), float(b[k]), float(a[k - 1]), float(b[k - 1]),
                           self.eta) for k in range(self.n_steps, 0, -1)]
