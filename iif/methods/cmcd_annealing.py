"""``cmcd_annealing``: controlled Monte Carlo diffusion's log-variance loss on the reward-annealing path (B) (Vargas et
al. 2024; docs/tilting.md §5, "Path (B)")."""
from __future__ import annotations

import math

import torch

from iif.methods.annealed import AnnealedTransport


class AnnealedCMCD(AnnealedTransport):
    """Minimise ``Var_Q[A]`` of the path-(B) work over the drift ``c``, ``Q`` the detached current forward law.

    ``A - log Z`` is the log-ratio of the backward to the forward path law (exact in discrete time), so
    ``Var(A) = 0`` iff the two agree, i.e. ``c`` transports ``gamma_lambda`` along the chain.

    Each optimiser step:

    1. draw ``b`` forward paths ``x_{0:K}`` of the current drift, detached;
    2. ``A_i = log gamma_1(x_K) - log pi_0(x_0) + sum_k [log B_k - log F_k]``, with the graph through ``c`` in every
       forward and backward kernel (``RewardAnnealing.works``);
    3. ``loss = Var(A)`` (the unbiased sample variance); step.

    Logged: the loss, ``batch_kl_gap = logmeanexp(A) - mean(A)`` (a batch estimate of ``KL(P^F || P^B)``), and
    ``log_z_batch = logmeanexp(A)`` (Jarzynski on the batch).
    """

    min_batch = 2  # a sample variance

    def fit_step(self, iteration: int) -> dict[str, float]:
        losses, gaps, log_zs, norms = [], [], [], []
        for _ in range(self.grad_steps):
            # 1. detached on-policy paths
            states = self.on_policy_paths()
            # 2. works with the graph through the drift
            work = self.chain.works(self.base, self.reward, self.guidance, states)
            # 3. log-variance loss
            loss = work.var()
            norms.append(self.trainer.minimise(loss))
            w = work.detach()
            log_z = (torch.logsumexp(w, 0) - math.log(len(w))).item()
            losses.append(loss.item())
            gaps.append(log_z - w.mean().item())
            log_zs.append(log_z)
        n = len(losses)
        return {"loss": sum(losses) / n, "batch_kl_gap": sum(gaps) / n, "log_z_batch": sum(log_zs) / n,
                "grad_norm": sum(norms) / n, "lr": self.trainer.lr}
