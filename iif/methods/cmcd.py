"""``cmcd``: controlled Monte Carlo diffusion's log-variance loss adapted to tilting (Vargas et al. 2024; the unified
paper's thermodynamic view, docs/tilting.md §4.3)."""
from __future__ import annotations

import math

import torch

from iif.distributed import world
from iif.methods.vargrad import VarGrad

Tensor = torch.Tensor


class CMCD(VarGrad):
    """Minimise ``Var_Q[W]`` of the CMCD path work with the base path's noising chain as the backward process.

    CMCD transports ``pi_0 = N(0, I)`` to ``pi_1 ∝ gamma = p_data e^{r/lambda}`` with a learned forward chain ``P^h`` and
    a backward chain ``B``; its log Radon–Nikodym derivative is ``W - log Z`` with

        ``W = log gamma(x_0) + log B(x_{1:N} | x_0) - log P^h(x_{0:N})``

    (exact in discrete time for any ``h``). With ``B = q``, the base path's noising chain (the tilted diffusion-time path
    of the unified paper: its intermediate marginals are the tilt's noised marginals), ``W`` is the path work of
    ``iif.metrics.works``: ``W = log gamma(x_0) + log_rnd + log_backward``, all accumulated during sampling.

    1. draw ``b`` trajectories of ``P^h`` without a graph, keeping states and noises;
    2. ``ell_i = -W_i``;
    3. ``grad Var(ell)`` at ``Q = P^h`` detached (log-variance loss): ``log gamma(x_0)`` and ``log q`` do not depend on
       ``h`` once the states are detached, so ``grad ell_i`` is VarGrad's (``-grad log P^h``, accumulated one step at
       a time) and only the weights ``ell_i - mean ell`` differ from VarGrad's;
    4. clip, step.

    Difference with ``vargrad``: VarGrad's work ``r + log dP^0/dP^h`` tilts the base *chain* (its fixed point is the
    chain's own tilt, which carries the chain's discretisation error); CMCD's tilts the *data law* and its fixed
    point is the exact tilt wherever the guided kernels can represent it. It needs ``log p_data`` (the analytic
    bases: ``BaseModel.data_log_prob``). CMCD's KL loss ``E_{P^h}[-W]`` is the pathwise SC loss (``method=pathwise``)
    up to a constant.

    Args: as :class:`~iif.methods.vargrad.VarGrad`.
    """

    def __init__(self, base, reward, sampler, guidance, buffer=None, conditions=None, **kwargs):
        super().__init__(base, reward, sampler, guidance, buffer, conditions, **kwargs)
        if getattr(base, "data_log_prob", None) is None:
            raise ValueError("method 'cmcd' needs the base's data log-density (an analytic base: base_model=gmm_exact)")
        if any(k.std == 0 for k in sampler.kernels(base)):
            raise ValueError("method 'cmcd' needs every sampler step stochastic (sampler=ddpm with last_step=noise, "
                             "or sampler=em)")

    def fit_step(self, iteration: int) -> dict[str, float]:
        losses, gaps, norms = [], [], []
        ranks, b = world(), self.batch_size
        for _ in range(self.grad_steps):
            # 1. detached on-policy trajectories
            traj = self.sampler.sample(self.base, self.guidance, b, cond=self.conditions_for(b), keep_states=True,
                                       rows=ranks.shard(b))
            # 2. ell = -W, the CMCD work with the noising chain as backward process
            log_gamma = self.base.data_log_prob(traj.x0).to(torch.float64) + self.reward.log_tilt(
                traj.x0, traj.cond).to(torch.float64)
            ell = -(log_gamma + traj.log_rnd + traj.log_backward)
            ell_all = ranks.gather(ell, b)
            # 3. gradient of the sample variance
            self.trainer.zero_grad()
            self.accumulate_gradient(traj, ell, ell_all.mean(), b, scale=ranks.size)
            # 4. step
            norms.append(self.trainer.step())
            losses.append(ell_all.var().item())
            gaps.append(torch.logsumexp(-ell_all, 0).item() - math.log(b) + ell_all.mean().item())
        n = len(losses)
        return {"loss": sum(losses) / n, "batch_kl_gap": sum(gaps) / n, "grad_norm": sum(norms) / n, "lr": self.trainer.lr}
