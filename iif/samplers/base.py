"""Samplers: a chain of Gaussian reverse kernels, and the one loop that runs any of them with a guidance ``h``,
accumulating the path log Radon–Nikodym derivative on the fly (docs/methods.md §0.2, §2.3–2.4, "Reverse kernels").

A sampler owns its step maths: :meth:`Sampler.kernels` lists one :class:`Kernel` per step, and every method that
needs per-step quantities (IIF's weights, VarGrad, DPOK, adjoint matching, pathwise) reads them from the kernels
and re-derives nothing, so a new sampler serves every method.
"""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from tqdm.auto import tqdm

from iif.utils import progress_enabled

Tensor = torch.Tensor


@dataclass
class Trajectory:
    """What one run of a (guided) sampler returns.

    Attributes:
        x0: ``[B, *shape]`` final samples.
        log_rnd: ``[B]`` float64, ``log dP^0/dP^h`` of each path (docs/methods.md §2.3), accumulated during sampling;
            0 for the unguided sampler.
        control_cost: ``[B]`` float64, ``sum_t ||Delta_t||^2 / (2 c_t^2)``: the path KL integrand of the
            stochastic-control loss (§1.2); ``E[control_cost] = KL(P^h || P^0)``. None where the samples are not
            the endpoints of one diffusion path (e.g. best-of-K).
        cond: ``[B, ...]`` the condition of each sample (class label, prompt index, measurement), or None.
        states: ``[N+1, B, *shape]`` ``x_N, ..., x_0`` if asked for, else None.
        noises: ``[N, B, *shape]`` the ``z_t`` used at each step if asked for, else None (zeros at noiseless steps).
        base_means: ``[N, B, *shape]`` the base kernel means ``mu^0_t(x_t)`` of each step if asked for, else None.
        x0_hats: ``[N, B, *shape]`` the base's Tweedie estimates at ``x_N, ..., x_1`` if asked for, else None.
        nfe: network evaluations of the base model per sample (counted by the base: the guidance's evaluations of
            the base network included, e.g. a LoRA adapter's).
        stl_log_ratio: ``[B]`` float64 ``log dP^h/dP^0`` with the sticking-the-landing graph
            (``Sampler.rsample(stl=True)``), else None.
        log_backward: ``[B]`` float64 ``log q(x_{1:N} | x_0) - log P^0(x_{0:N})``, the log-ratio of the base path's
            noising chain started at ``x_0`` to the base chain (:meth:`Sampler.noising_path`,
            :meth:`Sampler.path_log_prob`), accumulated during sampling; with it the path weight
            ``log p_data(x_0) + r/lambda + log_rnd + log_backward`` is unbiased for ``log Z`` of the data-space tilt
            (docs/tilting.md §4.4). None where a kernel is deterministic (no path density) or rows were gathered.
    """

    x0: Tensor
    log_rnd: Tensor
    control_cost: Tensor | None
    cond: Tensor | None = None
    states: Tensor | None = None
    noises: Tensor | None = None
    base_means: Tensor | None = None
    x0_hats: Tensor | None = None
    nfe: int = 0
    stl_log_ratio: Tensor | None = None
    log_backward: Tensor | None = None


def rnd_step(delta: Tensor, z: Tensor, sigma: float) -> tuple[Tensor, Tensor]:
    """One step's ``log p^0(x'|x) - log p^h(x'|x)`` for ``x' = mu^0 + Delta + sigma z`` (docs/methods.md §2.3,
    [IIF 32–43]) and its quadratic part.

    ``log-RND increment = -||Delta||^2 / (2 sigma^2) - <Delta, z> / sigma``, summed over all data dimensions.
    Per-step sums in at least float32 (the network may run in half precision); the sampler accumulates them
    over steps in float64.

    Args:
        delta: ``[B, *shape]`` mean shift ``mu^h - mu^0``.
        z: ``[B, *shape]`` the standard normal draw of the step.
        sigma: the step's standard deviation (> 0).
    Returns:
        (increment ``[B]``, quadratic term ``||Delta||^2 / (2 sigma^2)`` ``[B]``).
    """
    d = delta.flatten(1)
    if d.dtype in (torch.float16, torch.bfloat16):
        d = d.float()
    quad = (d * d).sum(1) / (2 * sigma ** 2)
    cross = (d * z.flatten(1).to(d.dtype)).sum(1) / sigma
    return -(quad + cross), quad


def log_rnd_increment(delta: Tensor, z: Tensor, sigma: float) -> Tensor:
    """``log p^0(x'|x) - log p^h(x'|x)`` of one step, ``[B]`` float64 (see :func:`rnd_step`)."""
    d = delta.to(torch.float64)
    return rnd_step(d, z.to(torch.float64), sigma)[0]


def stl_step(shift: Tensor, delta_bar: Tensor, sigma: float) -> Tensor:
    """``log p^{h_bar}(x'|x) - log p^0(x'|x) = (||s||^2 - ||s - Delta_bar||^2) / (2 c^2)``, ``[B]`` float64,
    for the realised shift ``s = x' - mu^0(x)`` and a frozen-parameter guidance shift ``Delta_bar`` (both
    ``[B, *shape]``, with graphs through the states), ``sigma = c``. With ``s = Delta + c z`` and
    ``Delta_bar == Delta`` in value, it equals ``||Delta||^2 / (2 c^2) + <Delta, z> / c = -(log-RND increment)``
    (:func:`rnd_step`)."""
    s, d = shift.flatten(1).to(torch.float64), delta_bar.flatten(1).to(torch.float64)
    return ((s * s).sum(1) - ((s - d) ** 2).sum(1)) / (2 * sigma ** 2)


def gaussian_log_prob(x: Tensor, mean: Tensor, std: float) -> Tensor:
    """``log N(x; mean, std^2 I)`` summed over all but the first dimension: ``[B]`` float64."""
    d = x[0].numel()
    r = (x - mean).flatten(1).to(torch.float64)
    return -0.5 * (r * r).sum(1) / std ** 2 - d * math.log(std) - 0.5 * d * math.log(2 * math.pi)


def noising_coefficients(path, t: float, s: float) -> tuple[float, float]:
    """The base path's noising kernel ``q(x_t | x_s) = N(a x_s, v I)`` between times ``s < t``: ``a = alpha_t /
    alpha_s``, ``v = sigma_t^2 - a^2 sigma_s^2`` (the path's own transition, whatever sampler runs on it)."""
    ts = torch.tensor([t, s], dtype=torch.float64, device="cpu")
    alpha, sigma = path.alpha(ts), path.sigma(ts)
    a = float(alpha[0] / alpha[1])
    return a, float(sigma[0] ** 2 - a ** 2 * sigma[1] ** 2)


class Kernel(abc.ABC):
    """One reverse step ``x_t -> x_s`` (``s < t``): ``p^h(x_s | x_t) = N(mu^0(x_t) + Delta, c^2 I)`` with the base
    mean ``mu^0`` from the base's noise prediction and the guidance shift ``Delta = shift_coef * h`` linear in ``h``
    (score units). A kernel with ``std == 0`` is deterministic; ``guided`` says whether ``h`` moves it.

    Attributes:
        t, s: the step's start and end times (floats in ``[0, 1]``).
        var, std: ``c^2`` and ``c``.
        shift_coef: ``k_h`` with ``Delta = k_h h`` (guided score ``s_theta + h``, i.e. ``eps - sigma_t h``).
        guided: whether the step applies the guidance (False for a deterministic step of a stochastic sampler:
            a deterministic guided step would make ``P^h`` singular with respect to ``P^0``).
    """

    t: float
    s: float
    var: float
    std: float
    shift_coef: float
    guided: bool = True

    @abc.abstractmethod
    def base_mean(self, x: Tensor, eps: Tensor) -> Tensor:
        """``mu^0(x_t)`` from the base's noise prediction ``eps``, any shape."""

    def shift(self, h: Tensor) -> Tensor:
        """``Delta = shift_coef * h``."""
        return self.shift_coef * h

    def times(self, n: int, dtype=torch.float32, device=None) -> Tensor:
        """``[n]`` copies of ``t`` (the networks' time argument)."""
        return torch.full((n,), self.t, dtype=dtype, device=device)

    def noising(self, path) -> tuple[float, float]:
        """``(a, v)`` of the noising kernel ``q(x_t | x_s) = N(a x_s, v I)`` this step reverses: the path's own
        transition between the step's times (:func:`noising_coefficients`); a kernel that knows its endpoints'
        coefficients (DDIM's, which may end off the path) overrides it."""
        return noising_coefficients(path, self.t, self.s)


class Sampler(abc.ABC):
    """A chain of :class:`Kernel` s from ``x_N ~ N(0, I)`` to ``x_0``; subclasses implement :meth:`kernels`.

    For each kernel, with ``eps = eps_theta(x_t, t | cond)`` and ``h = h(x_t, t, x0_hat | cond)``:

    1. ``mu^0 = kernel.base_mean(x_t, eps)``                                (base mean)
    2. ``Delta = kernel.shift(h)`` if the kernel is guided, else 0          (guidance shift)
    3. ``x_s = mu^0 + Delta + c z``, ``z ~ N(0, I)`` (no draw where ``c = 0``)
    4. ``log RND -= ||Delta||^2 / (2 c^2) + <Delta, z> / c``                ([IIF 44]; stochastic guided steps)
    5. (``rsample(stl=True)`` only) ``stl_log_ratio += log p^{h_bar}(x_s|x_t) - log p^0(x_s|x_t)``, ``h_bar``
       the guidance with frozen parameters (:func:`stl_step`)
    6. (every kernel stochastic) ``log_backward += log q(x_t | x_s) - log p^0(x_s | x_t)``, the path's noising
       kernel against the base kernel (Gaussian log-densities, no network evaluation)

    One base evaluation per step; nothing else is evaluated for the RND.

    Attributes:
        provides: ``"per_step_kernels"`` when every guided kernel is stochastic (the RND exists).
        n_steps: ``N``.
    """

    provides: ClassVar[frozenset[str]] = frozenset({"per_step_kernels"})
    n_steps: int

    @abc.abstractmethod
    def kernels(self, base) -> list[Kernel]:
        """The ``N`` kernels of the chain on ``base``'s path, the noisiest first."""

    def path(self, base):
        """The Gaussian path the chain discretises: the base's own (``base.schedule``) unless a sampler overrides
        it (DDIM's ``path`` option)."""
        return base.schedule

    @torch.no_grad()
    def sample(self, base, guidance, n: int, *, cond: Tensor | None = None, keep_states: bool = False,
               accumulate_rnd: bool = True, progress: bool = False, rows: slice | None = None) -> Trajectory:
        """Draw ``n`` trajectories of the chain guided by ``guidance`` (``None``: the base chain).

        Randomness comes from the global torch RNG (seeded and checkpointed by the training loop).
        ``cond``: ``[n, ...]`` the condition of every trajectory (None: unconditional).
        ``keep_states`` also returns, per step, the states, noises, base means and base Tweedie estimates.
        ``rows``: run only these rows of the batch of ``n`` (one process's share, ``iif.distributed``): the noise
        of all ``n`` is drawn and the rows keep theirs, so they are the trajectories the whole batch would hold;
        ``cond`` holds all ``n`` rows.
        """
        return self._run(base, guidance, n, cond=cond, keep_states=keep_states, accumulate_rnd=accumulate_rnd,
                         progress=progress, rows=rows)

    def rsample(self, base, guidance, n: int, *, cond: Tensor | None = None, stl: bool = False,
                progress: bool = False, rows: slice | None = None) -> Trajectory:
        """Like :meth:`sample`, but differentiable: ``x0`` and ``control_cost`` keep the autograd graph through
        every step, the guidance and the base network (the reparametrised path; memory grows with ``N``).

        ``stl``: also return ``stl_log_ratio``, the path's ``log dP^h/dP^0`` with the "sticking the landing" graph
        (Roeder et al. 2017): per step ``log p^{h_bar}(x_s|x_t) - log p^0(x_s|x_t)`` where ``h_bar`` is the
        guidance with its parameters detached, evaluated at the (differentiable) states. Its value is ``-log_rnd``;
        its gradient is the reparametrised gradient of the path KL without the score term
        ``<z_t, d Delta_t / d theta |_x> / c_t`` (zero mean), so it vanishes path by path at the optimum.
        Costs one more guidance evaluation per step.
        """
        with torch.enable_grad():
            return self._run(base, guidance, n, cond=cond, keep_states=False, accumulate_rnd=True, progress=progress,
                             rows=rows, stl=stl)

    def noising_path(self, base, x0: Tensor) -> tuple[Tensor, Tensor]:
        """Run the base path's noising chain from ``x_0`` up the kernels' time grid: ``x_t = a x_s + sqrt(v) xi``
        (:func:`noising_coefficients`). Returns the states ``[N+1, B, *shape]`` in sampling order ``x_N, ..., x_0``
        (like ``Trajectory.states``) and ``log q(x_{1:N} | x_0)`` ``[B]`` float64. Under the memoryless base this
        is the bridge ``P(. | x_0)``; with ``x_0 ~ p_tilt`` it draws the reverse paths of Crooks' estimator."""
        kernels, path = self.kernels(base), self.path(base)
        states, x, log_q = [x0], x0, torch.zeros(x0.shape[0], dtype=torch.float64, device=x0.device)
        for k in reversed(kernels):  # from the cleanest step up
            a, v = k.noising(path)
            x_next = a * x + math.sqrt(v) * torch.randn_like(x)
            if v > 0:  # (v == 0: the step into a point start, deterministic like the start of every path)
                log_q += gaussian_log_prob(x_next, a * x, math.sqrt(v))
            states.append(x_next)
            x = x_next
        return torch.stack(states[::-1]), log_q

    @torch.no_grad()
    def path_log_prob(self, base, guidance, states: Tensor, cond: Tensor | None = None) -> Tensor:
        """``log P^h(x_{0:N})`` ``[B]`` float64 of given paths ``states [N+1, B, *shape]`` (``x_N, ..., x_0``):
        ``log p_N(x_N) + sum_k log N(x_s; mu^0(x_t) + Delta(x_t), c^2 I)`` (``p_N``: ``base.prior_log_prob``), one
        base (and guidance) evaluation per step. Every kernel must be stochastic."""
        kernels = self.kernels(base)
        if any(k.std == 0 for k in kernels):
            raise ValueError("the path density needs every kernel to be stochastic (a deterministic step has none)")
        if states.shape[0] != len(kernels) + 1:
            raise ValueError(f"expected {len(kernels) + 1} states x_N..x_0, got {states.shape[0]}")
        out = base.prior_log_prob(states[0])
        for i, k in enumerate(kernels):
            x = states[i]
            t = k.times(x.shape[0], x.dtype, x.device)
            eps = base.eps(x, t, cond)
            mean = k.base_mean(x, eps)
            if guidance is not None and k.guided:
                mean = mean + k.shift(guidance(x, t, base.x0_hat(x, t, eps), cond))
            out += gaussian_log_prob(states[i + 1], mean, k.std)
        return out

    @staticmethod
    def _noise(n: int, x: Tensor, rows: slice) -> Tensor:
        """``z ~ N(0, I)`` for the ``rows`` of a batch of ``n`` (the whole batch's draw, so a shard's rows hold the
        numbers they hold in the whole batch; a copy, so that kept noises do not pin the whole draw)."""
        z = torch.randn((n, *x.shape[1:]), dtype=x.dtype, device=x.device)
        return z if x.shape[0] == n else z[rows].clone()

    def _run(self, base, guidance, n, *, cond=None, keep_states, accumulate_rnd, progress, rows=None,
             stl=False) -> Trajectory:
        if n < 1:
            raise ValueError(f"number of samples must be >= 1, got {n}")
        rows = slice(None) if rows is None else rows
        x = base.prior_sample(n)[rows]
        cond = None if cond is None else cond[rows]
        n_rows = x.shape[0]
        log_rnd = torch.zeros(n_rows, dtype=torch.float64, device=x.device)
        control_cost = torch.zeros(n_rows, dtype=torch.float64, device=x.device)
        stl_log_ratio = torch.zeros(n_rows, dtype=torch.float64, device=x.device) if stl else None
        frozen = {name: p.detach() for name, p in guidance.named_parameters()} if stl else None
        keep = {"states": [x], "noises": [], "base_means": [], "x0_hats": []} if keep_states else None
        nfe_before = base.nfe
        kernels, path = self.kernels(base), self.path(base)
        # log q(x_{1:N} | x_0) - log P^0(x_{0:N}): defined when every kernel has a density
        log_backward = -base.prior_log_prob(x.detach()) if all(k.std > 0 for k in kernels) else None
        bar = tqdm(kernels, desc="sampling", leave=False, disable=not (progress and progress_enabled()))
        for k in bar:
            x_start = x.detach()
            t = k.times(n_rows, x.dtype, x.device)
            eps = base.eps(x, t, cond)
            x0_hat = base.x0_hat(x, t, eps) if guidance is not None or keep_states else None
            # 1. base mean
            mu0 = k.base_mean(x, eps)
            z = self._noise(n, x, rows) if k.std > 0 else torch.zeros_like(x)
            if keep_states:
                keep["base_means"].append(mu0.detach())
                keep["x0_hats"].append(x0_hat.detach())
                keep["noises"].append(z)
            if guidance is None or not k.guided:
                x = mu0 + k.std * z if k.std > 0 else mu0
            else:
                # 2. guidance shift from h(x_t, t), which sees the base's Tweedie estimate
                delta = k.shift(guidance(x, t, x0_hat, cond))
                # 3. step
                x_prev, x = x, mu0 + delta + k.std * z
                # 4. path log-RND and control cost, float64 (a deterministic guided step has none: no density)
                if accumulate_rnd and k.std > 0:
                    inc, quad = rnd_step(delta, z, k.std)
                    log_rnd += inc.detach()
                    control_cost = control_cost + quad
                if stl and k.std > 0:
                    # 5. sticking the landing: log p^{h_bar} - log p^0 at the new state, h_bar with frozen parameters
                    delta_bar = k.shift(torch.func.functional_call(guidance, frozen, (x_prev, t, x0_hat, cond)))
                    stl_log_ratio = stl_log_ratio + stl_step(x - mu0, delta_bar, k.std)
            if log_backward is not None:  # 6. noising-chain and base-kernel log-densities of the step
                a, v = k.noising(path)
                log_q = gaussian_log_prob(x_start, a * x.detach(), math.sqrt(v)) if v > 0 else 0.0  # point start
                log_backward += log_q - gaussian_log_prob(x.detach(), mu0.detach(), k.std)
            if keep_states:
                keep["states"].append(x.detach())
        stacked = {k: torch.stack(v) for k, v in keep.items()} if keep_states else {}
        # network evaluations per sample: the base's, and those a guidance made through it (an adapter)
        nfe = (base.nfe - nfe_before) // n_rows
        return Trajectory(x0=x, log_rnd=log_rnd, control_cost=control_cost, cond=cond, nfe=nfe,
                          stl_log_ratio=stl_log_ratio, log_backward=log_backward, **stacked)
