"""``csm``, ``tsm``, ``nsm``: score matching on importance-resampled samples of the current model (the unified
paper's score-matching view of tilting; docs/tilting.md §3)."""
from __future__ import annotations

import math

import torch

from iif.methods.base import FineTuned
from iif.score_targets import ScoreTarget, regression_error, tilted_score
from iif.time_sampling import UniformTime

Tensor = torch.Tensor


class ScoreMatching(FineTuned):
    """Regress the guidance on a score target ``Y`` at tilted samples, in control units (path-KL weighting).

    Each :meth:`fit_step`:

    1. draw ``N`` trajectories of the current guided chain ``P^h`` with their ``log RND = log dP^0/dP^h``;
    2. path weights ``W = r(x_0)/lambda + log RND``: ``E[e^W | x_0] ∝ p_tilt(x_0) / p^h(x_0)``, the importance
       weight of the endpoint (docs/tilting.md §4.4);
    3. resample ``n_keep`` endpoints with probabilities ``softmax(W)`` (multinomial) and push them into the buffer:
       approximate samples of ``p_tilt``, exact as ``N -> infinity`` and at the optimum (``W`` constant);
    4. ``M`` optimiser steps on ``L(h) = E[ g(t)^2 / p(t) || h(x_t, t) - (Y - s_base(x_t, t)) ||^2 ]`` with
       ``x_0 ~ buffer``, ``t ~ p`` (``time_sampler``), ``x_t = alpha(t) x_0 + sigma(t) eps`` (the base's bridge) and
       ``Y`` the score target (``iif.score_targets``: CSM, TSM or the mixed NSM). ``g(t)^2 / p(t)`` makes it the
       path KL ``KL(P* || P^h) = 1/2 int g^2 E||h - h*||^2 dt`` up to the target's variance, the weighting
       under which the variance claims of §5 are stated.

    Differentiated: ``h`` only; samples, targets, base outputs and the reward gradient are detached. Cost per
    iteration: ``N`` trajectories, ``N`` reward values, and per gradient step ``b`` base evaluations (plus ``b``
    reward gradients for the TSM and mixed targets).

    Args:
        target: the score target ``Y``.
        n_samples: ``N`` trajectories per iteration; n_keep: resampled endpoints pushed per iteration.
        grad_steps: ``M``; batch_size: ``b``.
        time_sampler: the training times (default ``U(1e-3, 1)``; ``BetaTime`` samples ``p ∝ g^2``, for which the
            weight is constant).
        optimizer, iterations, lr_final_factor, grad_clip, ema_decay: see ``iif.methods.optim.Trainer``.
    """

    requires = frozenset({"per_step_kernels"})

    def __init__(self, base, reward, sampler, guidance, buffer, conditions=None, *, target: ScoreTarget,
                 n_samples: int = 2048, n_keep: int = 1024, grad_steps: int = 100, batch_size: int = 512,
                 time_sampler=None, optimizer=None, iterations: int = 1, lr_final_factor: float = 1.0,
                 grad_clip: float = 0.0, ema_decay: float = 0.0):
        for name, val in dict(n_samples=n_samples, n_keep=n_keep, grad_steps=grad_steps, batch_size=batch_size).items():
            if val < 1:
                raise ValueError(f"method.{name} must be >= 1, got {val}")
        if target.needs_target_score and not reward.differentiable:
            raise ValueError(f"method '{target.name}' needs the reward's gradient; reward '{reward.name}' is not "
                             "differentiable (use method=csm)")
        super().__init__(base, reward, sampler, guidance, buffer, conditions, optimizer=optimizer,
                         total_steps=iterations * grad_steps, lr_final_factor=lr_final_factor, grad_clip=grad_clip,
                         ema_decay=ema_decay)
        self.target = target
        self.n_samples, self.n_keep, self.grad_steps, self.batch_size = n_samples, n_keep, grad_steps, batch_size
        self.time_sampler = time_sampler or UniformTime()

    def fit_step(self, iteration: int) -> dict[str, float]:
        # 1. trajectories of the current model with their log-RND (no graph)
        cond = self.conditions_for(self.n_samples)
        with self.trainer.sampling_weights():
            traj = self.sampler.sample(self.base, self.guidance, self.n_samples, cond=cond)
        # 2. path weights
        log_r = self.reward.log_tilt(traj.x0, traj.cond).to(torch.float64)
        w = log_r + traj.log_rnd
        p = torch.softmax(w, 0)
        # 3. multinomial resampling into the buffer
        idx = torch.multinomial(p.float(), self.n_keep, replacement=True)
        self.buffer.add(traj.x0[idx], None if cond is None else cond[idx])
        # 4. regression on the score target
        losses = [self.trainer_step() for _ in range(self.grad_steps)]
        return {"loss": sum(losses) / len(losses), "ess_frac": (1.0 / (p ** 2).sum() / len(p)).item(),
                "log_z_jarzynski": torch.logsumexp(w, 0).item() - math.log(len(w)),
                "work_mean": w.mean().item(), "batch_reward_mean": (log_r * self.reward.temperature).mean().item(),
                "buffer_size": len(self.buffer), "lr": self.trainer.lr}

    def trainer_step(self) -> float:
        loss = self.loss(*self.buffer.sample(self.batch_size))
        self.trainer.minimise(loss)
        return loss.item()

    def loss(self, x0: Tensor, cond: Tensor | None = None) -> Tensor:
        """``mean g(t)^2 / p(t) ||h - (Y - s_base)||^2`` on a minibatch ``x0 [b, *shape]``."""
        sched, device = self.base.schedule, self.base.device
        x0 = x0.to(device)
        cond = None if cond is None else cond.to(device)
        t = self.time_sampler(x0.shape[0], sched).to(device)
        eps = torch.randn_like(x0)
        score = tilted_score(self.base, self.reward, x0, cond) if self.target.needs_target_score else None
        err, _ = regression_error(self.base, self.guidance, self.target, x0, t, eps, cond, score)
        t64 = t.to(torch.float64)
        weight = sched.diffusion_sq(t64) / self.time_sampler.density(t64, sched)
        return (weight.to(err.dtype) * err).mean()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "buffer": self.buffer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.buffer.load_state_dict(state["buffer"])
