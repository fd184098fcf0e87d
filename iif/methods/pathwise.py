"""``pathwise``: online fine-tuning by the stochastic-control loss, backpropagating through the whole trajectory
(the IIF paper's online fine-tuning on the 2D toy; docs/methods.md §7.2, [IIF 10])."""
from __future__ import annotations

from iif.distributed import world
from iif.methods.base import FineTuned


class Pathwise(FineTuned):
    """Minimise ``L_SC(h) = E_{P^h}[ sum_t ||Delta_t||^2 / (2 sigma_t^2) - r(x_0)/lambda ]`` by its reparametrised
    gradient: ``KL(P^h || P^0) - E[r/lambda]``, whose minimiser is the tilted path measure.

    Each optimiser step:

    1. draw ``b`` trajectories ``x_N -> x_0`` of ``P^h`` with the graph kept through every step, the guidance,
       the base network (frozen weights, differentiated in ``x``) and the reward-informed features;
    2. ``loss = mean_i [ KL_i - r(x_0^i)/lambda ]`` with the path-KL integrand ``KL_i`` either
       ``control_cost = sum_t ||Delta_t||^2/(2 c_t^2)``, ``Delta_t = kernel.shift(h(x_t, t))`` (its
       expectation over ``z``), or, with ``stl``, the path's ``log dP^h/dP^0`` with the sticking-the-landing graph
       (``Sampler.rsample``; Roeder et al. 2017): both unbiased; the STL gradient vanishes path by path at
       the optimum;
    3. backpropagate through the whole chain (memory ``O(b * N)``: it grows linearly with the number of steps),
       clip, step.

    Nothing is detached: the states depend on ``h`` and are differentiated.

    Args:
        batch_size: ``b`` trajectories per optimiser step.
        grad_steps: optimiser steps (each with fresh trajectories) per outer iteration.
        optimizer, iterations, lr_final_factor, grad_clip, ema_decay: see ``iif.methods.optim.Trainer``.
        stl: use the sticking-the-landing estimator (one more guidance evaluation per step).
    """

    requires = frozenset({"differentiable_reward", "differentiable_base", "per_step_kernels"})
    data_parallel = True  # each process backpropagates through its rows; the trainer averages the gradients

    def __init__(self, base, reward, sampler, guidance, buffer=None, conditions=None, *, batch_size: int = 256, grad_steps: int = 10,
                 optimizer=None, iterations: int = 1, lr_final_factor: float = 1.0, grad_clip: float = 0.0,
                 ema_decay: float = 0.0, stl: bool = True):
        for name, val in dict(batch_size=batch_size, grad_steps=grad_steps).items():
            if val < 1:
                raise ValueError(f"method.{name} must be >= 1, got {val}")
        super().__init__(base, reward, sampler, guidance, buffer, conditions, optimizer=optimizer,
                         total_steps=iterations * grad_steps, lr_final_factor=lr_final_factor, grad_clip=grad_clip,
                         ema_decay=ema_decay)
        world().check_divisible("method.batch_size", batch_size)
        self.batch_size, self.grad_steps, self.stl = batch_size, grad_steps, stl

    def fit_step(self, iteration: int) -> dict[str, float]:
        losses, kls, rewards, norms = [], [], [], []
        for _ in range(self.grad_steps):
            # 1. differentiable trajectories of P^h
            traj = self.sampler.rsample(self.base, self.guidance, self.batch_size, stl=self.stl,
                                        cond=self.conditions_for(self.batch_size), rows=world().shard(self.batch_size))
            # 2. the stochastic-control loss (reward gradients counted by the reward)
            log_r = self.reward.log_tilt_autograd(traj.x0, traj.cond)
            cost = traj.control_cost.to(log_r.dtype)
            path_kl = traj.stl_log_ratio.to(log_r.dtype) if self.stl else cost
            loss = (path_kl - log_r).mean()
            # 3. backpropagate through the chain
            norms.append(self.trainer.minimise(loss))
            losses.append(loss.item())
            kls.append(cost.mean().item())
            rewards.append((log_r * self.reward.temperature).mean().item())
        n = len(losses)
        logged = world().mean({"loss": sum(losses) / n, "kl_path": sum(kls) / n, "batch_reward_mean": sum(rewards) / n})
        return {**logged, "grad_norm": sum(norms) / n, "lr": self.trainer.lr}
