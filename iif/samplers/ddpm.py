"""``ddpm``: ancestral sampling of the (guided) reverse chain with the path log-RND accumulated on the fly."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from iif.base_models.base import BaseModel
from iif.guidance.base import Guidance
from iif.samplers.base import Trajectory
from iif.utils import progress_enabled

Tensor = torch.Tensor


def rnd_step(delta: Tensor, z: Tensor, sigma: float) -> tuple[Tensor, Tensor]:
    """One step's ``log p^0(x'|x) - log p^h(x'|x)`` for ``x' = mu^0 + Delta + sigma z`` (METHODS.md §2.3,
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
    """``log p^{h_bar}(x'|x) - log p^0(x'|x) = (||s||^2 - ||s - Delta_bar||^2) / (2 sigma^2)``, ``[B]`` float64,
    for the realised shift ``s = x' - mu^0(x)`` and a frozen-parameter guidance shift ``Delta_bar`` (both
    ``[B, *shape]``, with graphs through the states). With ``s = Delta + sigma z`` and ``Delta_bar == Delta`` in value, it equals
    ``||Delta||^2 / (2 sigma^2) + <Delta, z> / sigma = -(log-RND increment)`` (:func:`rnd_step`)."""
    s, d = shift.flatten(1).to(torch.float64), delta_bar.flatten(1).to(torch.float64)
    return ((s * s).sum(1) - ((s - d) ** 2).sum(1)) / (2 * sigma ** 2)


class Step:
    """Coefficients of one reverse step ``x_k -> x_{k-1}`` of the DDPM chain (METHODS.md §0.2).

    Attributes:
        k: step index (``N..1``); t: its time ``k / N``; alpha, beta, abar: ``alpha_k, beta_k, alphabar_k``;
        sigma: the kernel std ``sqrt(beta_k)``.
    """

    __slots__ = ("k", "t", "alpha", "beta", "abar", "sigma")

    def __init__(self, k: int, t: float, alpha: float, beta: float, abar: float):
        self.k, self.t, self.alpha, self.beta, self.abar = k, t, alpha, beta, abar
        self.sigma = beta ** 0.5

    def base_mean(self, x: Tensor, eps: Tensor) -> Tensor:
        """``mu^0_k(x) = (x - beta_k / sqrt(1 - alphabar_k) * eps) / sqrt(alpha_k)``, any shape."""
        return (x - self.beta / (1 - self.abar) ** 0.5 * eps) / self.alpha ** 0.5

    def shift(self, h: Tensor) -> Tensor:
        """``Delta_k = beta_k / sqrt(alpha_k) * h``: the mean shift of a score-unit guidance ``h`` [IIF 30]."""
        return self.beta / self.alpha ** 0.5 * h

    def times(self, n: int, dtype=torch.float32, device=None) -> Tensor:
        """``[n]`` copies of ``t`` (the networks' time argument)."""
        return torch.full((n,), self.t, dtype=dtype, device=device)


class DDPMSampler:
    """Ancestral DDPM sampler (METHODS.md §0.2, §2.3–2.4, Algorithm 1 step 1).

    For ``t = N..1``, with ``eps = eps_theta(x_t, t)`` and ``h = h(x_t, t)`` in score units:

    1. ``mu^0_t = (x_t - beta_t / sqrt(1 - alphabar_t) * eps) / sqrt(alpha_t)``  (base mean)
    2. ``Delta_t = beta_t / sqrt(alpha_t) * h``                                  (guidance shift)
    3. ``x_{t-1} = mu^0_t + Delta_t + sigma_t z_t``, ``sigma_t^2 = beta_t``, ``z_t ~ N(0, I)``
    4. ``log RND -= ||Delta_t||^2 / (2 sigma_t^2) + <Delta_t, z_t> / sigma_t``    ([IIF 44])
    5. (``rsample(stl=True)`` only) ``stl_log_ratio += log p^{h_bar}(x_{t-1}|x_t) - log p^0(x_{t-1}|x_t)``, ``h_bar``
       the guidance with frozen parameters (:func:`stl_step`)

    ``sigma_t^2 = beta_t`` on every step, the last included, so every kernel is non-degenerate and the RND is
    finite (METHODS.md §2.4 option (a)). One base evaluation per step; nothing else is evaluated for the RND.

    Args:
        n_steps: number of steps N on the grid ``t_k = k / N`` of the base's VP-SDE.
    """

    def __init__(self, n_steps: int = 100):
        if n_steps < 1:
            raise ValueError(f"sampler.n_steps must be >= 1, got {n_steps}")
        self.n_steps = int(n_steps)

    def steps(self, base: BaseModel) -> list[Step]:
        """The ``N`` reverse steps ``k = N..1`` on the grid ``t_k = k / N`` of the base's VP-SDE."""
        sched = base.schedule.discretise(self.n_steps)
        return [Step(k, float(sched.t[k]), float(sched.alpha[k]), float(sched.beta[k]), float(sched.alphabar[k]))
                for k in range(self.n_steps, 0, -1)]

    @torch.no_grad()
    def sample(self, base: BaseModel, guidance: Guidance | None, n: int, *, keep_states: bool = False,
               accumulate_rnd: bool = True, progress: bool = False, rows: slice | None = None) -> Trajectory:
        """Draw ``n`` trajectories of the chain guided by ``guidance`` (``None``: the base chain).

        Randomness comes from the global torch RNG (seeded and checkpointed by the training loop).
        ``keep_states`` also returns, per step, the states, noises, base means and base Tweedie estimates.
        ``rows``: run only these rows of the batch of ``n`` (one process's share, ``iif.distributed``): the noise
        of all ``n`` is drawn and the rows keep theirs, so they are the trajectories the whole batch would hold.
        """
        return self._run(base, guidance, n, keep_states=keep_states, accumulate_rnd=accumulate_rnd,
                         progress=progress, rows=rows)

    def rsample(self, base: BaseModel, guidance: Guidance, n: int, *, stl: bool = False, progress: bool = False,
                rows: slice | None = None) -> Trajectory:
        """Like :meth:`sample`, but differentiable: ``x0`` and ``control_cost`` keep the autograd graph through
        every step, the guidance and the base network (the reparametrised path; memory grows with ``N``).

        ``stl``: also return ``stl_log_ratio``, the path's ``log dP^h/dP^0`` with the "sticking the landing" graph
        (Roeder et al. 2017): per step ``log p^{h_bar}(x_{t-1}|x_t) - log p^0(x_{t-1}|x_t)`` where ``h_bar`` is the
        guidance with its parameters detached, evaluated at the (differentiable) states. Its value is ``-log_rnd``;
        its gradient is the reparametrised gradient of the path KL without the score term
        ``<z_t, d Delta_t / d theta |_x> / sigma_t`` (zero mean), so it vanishes path by path at the optimum.
        Costs one more guidance evaluation per step.
        """
        with torch.enable_grad():
            return self._run(base, guidance, n, keep_states=False, accumulate_rnd=True, progress=progress, rows=rows,
                             stl=stl)

    @staticmethod
    def _noise(n: int, x: Tensor, rows: slice) -> Tensor:
        """``z ~ N(0, I)`` for the ``rows`` of a batch of ``n`` (the whole batch's draw, so a shard's rows hold the
        numbers they hold in the whole batch; a copy, so that kept noises do not pin the whole draw)."""
        z = torch.randn((n, *x.shape[1:]), dtype=x.dtype, device=x.device)
        return z if x.shape[0] == n else z[rows].clone()

    def _run(self, base, guidance, n, *, keep_states, accumulate_rnd, progress, rows=None, stl=False) -> Trajectory:
        if n < 1:
            raise ValueError(f"number of samples must be >= 1, got {n}")
        rows = slice(None) if rows is None else rows
        x = base.prior_sample(n)[rows]
        n_rows = x.shape[0]
        log_rnd = torch.zeros(n_rows, dtype=torch.float64, device=x.device)
        control_cost = torch.zeros(n_rows, dtype=torch.float64, device=x.device)
        stl_log_ratio = torch.zeros(n_rows, dtype=torch.float64, device=x.device) if stl else None
        frozen = {name: p.detach() for name, p in guidance.named_parameters()} if stl else None
        keep = {"states": [x], "noises": [], "base_means": [], "x0_hats": []} if keep_states else None
        bar = tqdm(self.steps(base), desc="sampling", leave=False, disable=not (progress and progress_enabled()))
        for step in bar:
            t = step.times(n_rows, x.dtype, x.device)
            eps = base.eps(x, t)
            x0_hat = base.x0_hat(x, t, eps) if guidance is not None or keep_states else None
            # 1. base mean
            mu0 = step.base_mean(x, eps)
            z = self._noise(n, x, rows)
            if keep_states:
                keep["base_means"].append(mu0.detach())
                keep["x0_hats"].append(x0_hat.detach())
                keep["noises"].append(z)
            if guidance is None:
                x = mu0 + step.sigma * z
            else:
                # 2. guidance shift from h(x_t, t), which sees the base's Tweedie estimate
                delta = step.shift(guidance(x, t, x0_hat))
                # 3. step
                x_prev, x = x, mu0 + delta + step.sigma * z
                # 4. path log-RND and control cost, float64
                if accumulate_rnd:
                    inc, quad = rnd_step(delta, z, step.sigma)
                    log_rnd += inc.detach()
                    control_cost = control_cost + quad
                if stl:
                    # 5. sticking the landing: log p^{h_bar} - log p^0 at the new state, h_bar with frozen parameters
                    delta_bar = step.shift(torch.func.functional_call(guidance, frozen, (x_prev, t, x0_hat)))
                    stl_log_ratio = stl_log_ratio + stl_step(x - mu0, delta_bar, step.sigma)
            if keep_states:
                keep["states"].append(x.detach())
        stacked = {k: torch.stack(v) for k, v in keep.items()} if keep_states else {}
        return Trajectory(x0=x, log_rnd=log_rnd, control_cost=control_cost, nfe=self.n_steps,
                          stl_log_ratio=stl_log_ratio, **stacked)
