"""``nets``: non-equilibrium transport sampling's PINN loss on the diffusion-time tilting path (Albergo & Vanden-Eijnden
2025; the unified paper's thermodynamic view, docs/tilting.md §4.2)."""
from __future__ import annotations

import torch
from torch import nn

from iif.methods.base import FineTuned
from iif.metrics.log_z import ess_frac, jarzynski
from iif.nn import TimeMLP, divergence
from iif.samplers.flow_sde import log_alpha_rate

Tensor = torch.Tensor


class LinearRewardPath:
    """The tilting path ``r_t(x) = kappa(t) r(x) / lambda``, ``kappa(t) = 1 - t``: 0 at the prior (``t = 1``), the
    reward at the data end. In generative time ``tau = 1 - t``: ``d_tau r_tau = r / lambda`` and
    ``grad r_tau = kappa grad r / lambda``. Any other path (e.g. the SOC path ``r_t = log h_t``, docs/tilting.md §4.2)
    is an object with the same two methods."""

    def __init__(self, reward):
        self.reward = reward

    def rate(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """``d_tau r_tau [B]`` at ``x [B, *shape]``, ``t [B]``."""
        return self.reward.log_tilt(x.detach(), cond).to(x.dtype)

    def grad(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """``grad_x r_tau [B, *shape]``."""
        kappa = (1 - t).to(x.dtype).view(-1, *[1] * (x.dim() - 1))
        return kappa * self.reward.grad_log_tilt(x.detach(), cond).to(x.dtype)


class NETSDrift(nn.Module):
    """The guidance NETS samples with, and its learned free energy.

    Path of densities (generative time ``tau = 1 - t``): ``gamma_t(x) = p^base_t(x) exp(r_t(x))`` with ``r_t`` the
    ``path`` (:class:`LinearRewardPath`: ``kappa(t) r(x) / lambda``, ``kappa = 1 - t``), from the prior (``t = 1``,
    ``Z = 1``) to the tilt (``t = 0``, ``Z``). The sampler's SDE ``dX = [v + c + eps (s_base + grad r_t)] dtau +
    sqrt(2 eps) dW`` with ``eps = g^2/2`` is the base's reverse SDE guided by ``h = c / g^2 + grad r_t / 2`` (score
    units), so ``control`` (any guidance module) holds ``u = c / g^2`` and this module adds ``grad r_t / 2``.

    Attributes:
        control: the learned ``u(x, t) = c(x, t) / g(t)^2``.
        path: ``r_t`` (its ``rate`` and ``grad``).
        free_energy: ``F(t) = (1 - t) phi(t)``, an estimate of ``log Z_t`` (``F(1) = 0``; ``F(0)``: of ``log Z``).
    """

    def __init__(self, control: nn.Module, path, hidden: int = 64):
        super().__init__()
        self.control, self.path = control, path
        self.phi = TimeMLP(0, 1, hidden=hidden, layers=2, t_dim=16, zero_init=True, t_scale=10.0)  # smooth in t

    def free_energy(self, t: Tensor) -> Tensor:
        """``F(t) [B]`` for ``t [B]``."""
        return (1 - t) * self.phi(t.new_zeros(t.shape[0], 0), t)[:, 0]

    def forward(self, x: Tensor, t: Tensor, x0_hat: Tensor, cond: Tensor | None = None) -> Tensor:
        return self.control(x, t, x0_hat, cond) + 0.5 * self.path.grad(x, t, cond)


class NETS(FineTuned):
    """Fit the transport correction ``c`` and the free energy ``F`` by the PINN residual of the tilting path.

    With ``v = -f x + g^2/2 s_base`` the base's probability-flow velocity and ``c = g^2 u``, the residual of the
    continuity equation of ``pi_t = gamma_t / Z_t`` (generative time; exact transport iff ``R == 0``):

        ``R = d_tau r_tau + grad r_tau . v + div c + (s_base + grad r_tau) . c - d_tau F``,
        ``r_tau = kappa r / lambda``, ``d_tau r_tau = r / lambda``, ``grad r_tau = kappa grad r / lambda``.

    Each optimiser step:

    1. draw ``b`` trajectories of the current sampler (``h`` of :class:`NETSDrift`) without a graph, states kept;
    2. pick ``S`` states per trajectory at random steps (the off-policy law ``mu_t``: any full-support law works);
    3. ``loss = mean R^2`` at those states, with ``div c`` exact (``dim <= exact_divergence_max``: one
       autograd pass per coordinate, through the guidance's input ``x0_hat(x)`` too) or Hutchinson's (one Rademacher
       probe);
    4. step (``u`` and ``F`` together).

    ``F(0)`` estimates ``log Z`` (logged as ``log_z_nets``); so does Jarzynski's estimate from the escorted works
    :meth:`escorted_works` of the first ``escorted_paths`` trajectories of each iteration (NETS' own estimator,
    logged as ``log_z_escorted`` with the works' ``escorted_ess_frac``); the path works of any run
    (``iif.metrics.works``, exact in discrete time) give the evaluators' Jarzynski/BAR estimates of the same.
    Differentiated: ``u`` (and its divergence) and ``F``; states, base score, reward and its gradient are detached.

    Args:
        batch_size: ``b``; loss_steps: ``S``; grad_steps: optimiser steps per iteration.
        free_energy_hidden: width of ``F``'s network.
        exact_divergence_max: the largest sample dimension with the exact divergence.
        escorted_paths: trajectories per iteration whose escorted works are computed and logged (0: none; each costs
            one :meth:`work_rate` per sampling step).
        optimizer, iterations, lr_final_factor, grad_clip, ema_decay: see ``iif.methods.optim.Trainer``.
    """

    requires = frozenset({"differentiable_reward", "differentiable_base", "per_step_kernels"})
    WORK_CHUNK = 1024  # paths per escorted-works pass (each holds a divergence's graph)

    def __init__(self, base, reward, sampler, guidance, buffer=None, conditions=None, *, batch_size: int = 256,
                 loss_steps: int = 8, grad_steps: int = 10, free_energy_hidden: int = 64,
                 exact_divergence_max: int = 16, escorted_paths: int = 0, optimizer=None, iterations: int = 1,
                 lr_final_factor: float = 1.0, grad_clip: float = 0.0, ema_decay: float = 0.0):
        if escorted_paths < 0 or escorted_paths == 1:
            raise ValueError(f"method.escorted_paths must be 0 (off) or >= 2 (an estimate needs two paths), got "
                             f"{escorted_paths}")
        if min(batch_size, loss_steps, grad_steps) < 1:
            raise ValueError(f"method.batch_size, loss_steps and grad_steps must be >= 1, got {batch_size}, "
                             f"{loss_steps}, {grad_steps}")
        if base.schedule.point_start:
            raise ValueError("method 'nets' needs the base's probability-flow velocity, infinite at the point start of "
                             f"{base.schedule!r}; use method=nets_annealing (path (B)) on that base")
        drift = NETSDrift(guidance, LinearRewardPath(reward), free_energy_hidden).to(base.device)
        super().__init__(base, reward, sampler, drift, buffer, conditions, optimizer=optimizer,
                         total_steps=iterations * grad_steps, lr_final_factor=lr_final_factor, grad_clip=grad_clip,
                         ema_decay=ema_decay)
        self.batch_size, self.loss_steps, self.grad_steps = batch_size, loss_steps, grad_steps
        self.exact_divergence_max, self.escorted_paths = exact_divergence_max, escorted_paths
        kernels = sampler.kernels(base)
        if loss_steps > len(kernels):
            raise ValueError(f"method.loss_steps={loss_steps} exceeds the sampler's n_steps={len(kernels)}")
        self._t = torch.tensor([k.t for k in kernels], device=base.device)

    def work_rate(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """The escorted work's rate ``dA/dtau = d_tau r_tau + grad r_tau . v + div c + (s_base + grad r_tau) . c``
        ``[B]`` at states ``x [B, *shape]`` and times ``t [B]``, with a graph to ``u`` (docs/tilting.md §4.2)."""
        sched = self.base.schedule
        t64 = t.to(torch.float64)
        shape = (-1,) + (1,) * (x.dim() - 1)
        sigma = sched.sigma(t64).to(x.dtype).view(shape)
        g2 = sched.diffusion_sq(t64).to(x.dtype).view(shape)
        f = log_alpha_rate(sched, t64).to(x.dtype).view(shape)
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            eps = self.base.eps(x, t, cond)
            s_base = (-eps / sigma).detach()
            c = g2 * self.guidance.control(x, t, self.base.x0_hat(x, t, eps), cond)
            div = divergence(c, x, self.exact_divergence_max)
        path = self.guidance.path
        grad_r = path.grad(x.detach(), t, cond).detach()
        v = -f * x.detach() + 0.5 * g2 * s_base
        dot = lambda a, b: (a * b).flatten(1).sum(1)  # noqa: E731
        return path.rate(x.detach(), t, cond).detach() + dot(grad_r, v) + div + dot(s_base + grad_r, c)

    def residual(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """``R(x, t) = dA/dtau - d_tau F`` ``[B]`` at states ``x [B, *shape]`` and times ``t [B]``, with a graph to
        ``u`` and ``F``."""
        with torch.enable_grad():
            tt = t.detach().requires_grad_(True)
            (dF_dt,) = torch.autograd.grad(self.guidance.free_energy(tt).sum(), tt, create_graph=True)
        return self.work_rate(x, t, cond) + dF_dt.to(x.dtype)  # d_tau F = -dF/dt

    def escorted_works(self, states: Tensor, cond: Tensor | None = None) -> Tensor:
        """The escorted (NETS) works ``A [B]`` float64 of sampled paths ``states [N+1, B, *shape]`` (``x_N..x_0``):
        ``A = sum_k (t_k - s_k) dA/dtau(x_{t_k}, t_k)``, the left-point rule for ``A = int_0^1 dA/dtau dtau``.

        Jarzynski: ``E[e^A] = Z`` and ``E[A] <= log Z`` in continuous time; the sum carries an ``O(1/N)`` bias (unlike
        the path works of ``iif.metrics.works``, exact in discrete time). At the exact transport ``A = log Z`` on
        every path, up to that bias."""
        kernels = self.sampler.kernels(self.base)
        b = states.shape[1]
        works = torch.zeros(b, dtype=torch.float64, device=states.device)
        for k, kernel in enumerate(kernels):
            t = torch.full((b,), kernel.t, device=states.device, dtype=states.dtype)
            rate = self.work_rate(states[k], t, cond).detach()
            works += (kernel.t - kernel.s) * rate.to(torch.float64)
        return works

    def fit_step(self, iteration: int) -> dict[str, float]:
        losses, norms, escorted = [], [], {}
        b, s = self.batch_size, self.loss_steps
        for step in range(self.grad_steps):
            # 1. detached trajectories of the current sampler
            cond = self.conditions_for(b)
            with self.trainer.sampling_weights():
                traj = self.sampler.sample(self.base, self.guidance, b, cond=cond, keep_states=True,
                                           accumulate_rnd=False)
                if step == 0 and self.escorted_paths:  # NETS' own log Z estimate, on the law that drew the paths
                    escorted = self._escorted_estimate(traj, cond)
            # 2. S states per trajectory at random steps
            idx = torch.rand(b, len(self._t), device=self._t.device).argsort(dim=1)[:, :s]  # [b, S]
            cols = torch.arange(b, device=idx.device)[:, None].expand_as(idx)
            x = traj.states[idx, cols].reshape(b * s, *traj.states.shape[2:])
            c_rep = None if cond is None else cond.repeat_interleave(s, dim=0)
            # 3. PINN loss
            loss = (self.residual(x, self._t[idx.reshape(-1)], c_rep) ** 2).mean()
            # 4. step
            norms.append(self.trainer.minimise(loss))
            losses.append(loss.item())
        n = len(losses)
        return {"loss": sum(losses) / n, "log_z_nets": self.log_z_estimate(), **escorted,
                "grad_norm": sum(norms) / n, "lr": self.trainer.lr}

    def _escorted_estimate(self, traj, cond: Tensor | None, m: int | None = None) -> dict[str, float]:
        """Jarzynski's ``log Z`` from the escorted works of the first ``m`` (default ``escorted_paths``) paths of
        ``traj``, and the works' effective sample size as a fraction (the evaluators' estimators,
        ``iif.metrics.log_z``); the works in chunks of :attr:`WORK_CHUNK` paths (each holds a divergence's graph)."""
        m = min(self.escorted_paths if m is None else m, traj.states.shape[1])
        chunks = [slice(i, min(i + self.WORK_CHUNK, m)) for i in range(0, m, self.WORK_CHUNK)]
        works = torch.cat([self.escorted_works(traj.states[:, c], None if cond is None else cond[c]) for c in chunks])
        return {"log_z_escorted": jarzynski(works), "escorted_ess_frac": ess_frac(works)}

    def log_z_estimates(self, n: int) -> dict[str, float]:
        """``log_z_nets = F(0)`` (the learned free energy at the data end) and ``log_z_escorted`` (Jarzynski on the
        escorted works of ``n`` fresh paths of the sampling weights, with ``escorted_ess_frac``)."""
        cond = self.conditions_for(n)
        with self.trainer.sampling_weights():
            traj = self.sampler.sample(self.base, self.guidance, n, cond=cond, keep_states=True, accumulate_rnd=False)
            return {"log_z_nets": self.log_z_estimate(), **self._escorted_estimate(traj, cond, n)}

    @torch.no_grad()
    def log_z_estimate(self) -> float:
        """``F(0)``, the learned free energy at the data end."""
        return self.guidance.free_energy(torch.zeros(1, device=self._t.device)).item()
