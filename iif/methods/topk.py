"""``topk``: best-of-K sampling from the base model, no training (docs/methods.md §7.5)."""
from __future__ import annotations

import torch

from iif.methods.base_only import BaseOnly
from iif.samplers.base import Trajectory


class TopK(BaseOnly):
    """For each returned sample draw ``k`` base samples and keep the one with the highest reward.

    Costs ``k`` times the base sampling; the result is not the law of a diffusion path, so the path statistics
    (log-RND, control cost, hence ``sc_loss``) are not defined for it.

    Args:
        k: samples drawn per returned sample (state it in every table).
    """

    def __init__(self, base, reward, sampler, guidance=None, buffer=None, conditions=None, *, k: int = 4):
        super().__init__(base, reward, sampler, guidance, buffer, conditions)
        if k < 1:
            raise ValueError(f"method.k must be >= 1, got {k}")
        self.k = int(k)

    def sample(self, n: int, cond=None) -> Trajectory:
        """For each of the ``n`` conditions, the best of ``k`` base samples drawn with that condition."""
        cond = self.conditions_for(n, cond)
        cond_k = None if cond is None else cond.repeat_interleave(self.k, dim=0)
        traj = self.sampler.sample(self.base, None, n * self.k, cond=cond_k)
        x = traj.x0.reshape(n, self.k, *traj.x0.shape[1:])
        best = self.reward(traj.x0, cond_k).reshape(n, self.k).argmax(dim=1)
        return Trajectory(x0=x[torch.arange(n, device=x.device), best],
                          log_rnd=torch.zeros(n, dtype=torch.float64, device=x.device),
                          control_cost=None, cond=cond, nfe=traj.nfe * self.k)

    def path_log_prob(self, states, cond=None):
        """None: a best-of-K sample is not the endpoint of one diffusion path."""
        return None
