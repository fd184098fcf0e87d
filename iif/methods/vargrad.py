"""``vargrad``: online fine-tuning with the log-variance (VarGrad) loss on detached trajectories
(docs/methods.md §7.2, [IIF 57–59]; Richter et al. 2020)."""
from __future__ import annotations

import torch

from iif.distributed import world
from iif.methods.base import FineTuned
from iif.samplers.base import Trajectory

Tensor = torch.Tensor


class VarGrad(FineTuned):
    """Minimise ``L_VG(h) = Var_{X ~ Q^v}[ log dP^h/dP^0 (X) - r(x_0)/lambda ]`` at ``v = stopgrad(h)``.

    Per trajectory ``i`` (sampled from the current model, then detached) [IIF 59], discrete DDPM form:

        ``ell_i = -r(x_0^i)/lambda + sum_t [ <Delta_t, sg(Delta_t)>/c_t^2 - ||Delta_t||^2/(2 c_t^2)
                                               + <Delta_t, z_t>/c_t ]``

    over the sampler's stochastic guided kernels, with ``Delta_t = kernel.shift(h_phi(x_t, t))`` differentiated and ``x_t``, ``z_t``, ``sg(Delta_t)``,
    ``r`` detached. ``L = unbiased sample variance of {ell_i}``. Its gradient at ``v = h`` is twice the gradient of
    ``KL(P^h || P^tilt)`` (population variance), and needs the reward's value only.

    Each optimiser step:

    1. draw ``b`` trajectories of ``P^h`` without a graph, keeping states ``x_t``, noises ``z_t`` and the
       on-the-fly ``log RND = log dP^0/dP^h``;
    2. ``ell_i = -log RND_i - r(x_0^i)/lambda`` (the value of ``ell`` at ``v = h``: no extra network evaluation);
    3. ``grad L = 2/(b-1) sum_i (ell_i - mean ell) grad ell_i``; ``grad ell_i`` is a sum over steps, so it is
       accumulated one step at a time (``backward`` of ``sum_i c_i f_t(i)`` with ``c_i = 2 (ell_i - mean ell)/(b-1)``):
       the graph of ``h_phi`` is held for one step only and activation memory does not grow with ``N``;
    4. clip, step.

    With ``grad_fraction < 1`` the gradient is taken on a random subset of the steps only (the authors'
    "stochastic subsampling" stabiliser; it changes the estimator).

    Args:
        batch_size: ``b`` trajectories per optimiser step (>= 2).
        grad_steps: optimiser steps per outer iteration.
        grad_fraction: fraction of steps that carry the gradient.
        optimizer, iterations, lr_final_factor, grad_clip: see ``iif.methods.optim.Trainer`` (no EMA: the
            estimator needs the trajectories of the current ``h``).
    """

    requires = frozenset({"per_step_kernels"})
    data_parallel = True  # each process accumulates the gradient of its rows' terms (with the batch's mean ell)

    def __init__(self, base, reward, sampler, guidance, buffer=None, conditions=None, *, batch_size: int = 512, grad_steps: int = 10,
                 grad_fraction: float = 1.0, optimizer=None, iterations: int = 1, lr_final_factor: float = 1.0,
                 grad_clip: float = 0.0):
        if batch_size < 2 or grad_steps < 1:
            raise ValueError(f"method.batch_size must be >= 2 and method.grad_steps >= 1, got {batch_size}, "
                             f"{grad_steps}")
        if not 0 < grad_fraction <= 1:
            raise ValueError(f"method.grad_fraction must lie in (0, 1], got {grad_fraction}")
        super().__init__(base, reward, sampler, guidance, buffer, conditions, optimizer=optimizer,
                         total_steps=iterations * grad_steps, lr_final_factor=lr_final_factor, grad_clip=grad_clip)
        world().check_divisible("method.batch_size", batch_size)
        self.batch_size, self.grad_steps, self.grad_fraction = batch_size, grad_steps, grad_fraction

    def fit_step(self, iteration: int) -> dict[str, float]:
        losses, kls, rewards, norms = [], [], [], []
        ranks, b = world(), self.batch_size
        for _ in range(self.grad_steps):
            # 1. detached on-policy trajectories (this process's rows of the b)
            traj = self.sampler.sample(self.base, self.guidance, b, cond=self.conditions_for(b), keep_states=True,
                                       rows=ranks.shard(b))
            # 2. ell at v = h, of every process's rows (the variance is the whole batch's)
            log_r = self.reward.log_tilt(traj.x0, traj.cond).to(torch.float64)
            ell = -traj.log_rnd - log_r
            ell_all = ranks.gather(ell, b)
            # 3. gradient of the sample variance, one step at a time; each process holds the terms of its rows,
            #    scaled by the number of processes because the trainer averages the gradients over them
            self.trainer.zero_grad()
            self.accumulate_gradient(traj, ell, ell_all.mean(), b, scale=ranks.size)
            # 4. optimiser step
            norms.append(self.trainer.step())
            losses.append(ell_all.var().item())
            kls.append(ranks.gather(traj.control_cost, b).mean().item())
            rewards.append((ranks.gather(log_r, b) * self.reward.temperature).mean().item())
        n = len(losses)
        return {"loss": sum(losses) / n, "kl_path": sum(kls) / n, "batch_reward_mean": sum(rewards) / n,
                "grad_norm": sum(norms) / n, "lr": self.trainer.lr}

    def accumulate_gradient(self, traj: Trajectory, ell: Tensor, ell_mean: Tensor | None = None,
                            n_total: int | None = None, scale: float = 1.0) -> None:
        """Add ``grad_phi Var(ell)`` (unbiased) to the guidance's ``.grad``: the terms of the rows in ``traj``.

        Args:
            traj: ``b`` trajectories with ``states [N+1, b, *shape]``, ``noises``, ``base_means``, ``x0_hats``
                (``keep_states=True``) of the chain guided by ``sg(h)``.
            ell: ``[b]`` the per-trajectory ``ell_i`` at the current ``h``.
            ell_mean, n_total: the mean of ``ell`` and the size of the whole batch, when ``traj`` holds only some
                of its rows (default: ``traj`` is the batch); scale: a factor on the added gradient.
        """
        b = ell.shape[0]
        ell_mean = ell.mean() if ell_mean is None else ell_mean
        n_total = b if n_total is None else n_total
        coef = (scale * 2 * (ell - ell_mean) / (n_total - 1)).float()
        for i, k in enumerate(self.sampler.kernels(self.base)):
            if self.grad_fraction < 1 and torch.rand(()) >= self.grad_fraction:
                continue
            if not (k.guided and k.std > 0):  # h does not enter this step's kernel
                continue
            x, x_next, z = traj.states[i], traj.states[i + 1], traj.noises[i]
            delta_sg = x_next - traj.base_means[i] - k.std * z  # the shift the trajectory was drawn with
            delta = k.shift(self.guidance(x, k.times(b, x.dtype, x.device), traj.x0_hats[i], traj.cond))
            f = (((delta * delta_sg).flatten(1).sum(1) - 0.5 * (delta ** 2).flatten(1).sum(1)) / k.var
                 + (delta * z).flatten(1).sum(1) / k.std)
            (coef * f).sum().backward()
