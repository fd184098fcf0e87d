"""``nets_annealing``: non-equilibrium transport sampling's PINN loss on the reward-annealing path (B) (Albergo &
Vanden-Eijnden 2025; docs/tilting.md §5, "Path (B)")."""
from __future__ import annotations

import torch

from iif.methods.annealed import AnnealedTransport
from iif.nn import divergence


class AnnealedNETS(AnnealedTransport):
    """Fit the drift ``c`` and the free energy ``F`` by the continuity residual of path (B):

        ``R(x, s) = (d lambda/dt) r(x)/T + div c + c . grad log gamma_lambda(x) - dF/dt``,

    zero at every ``(x, s)`` iff ``c`` transports ``pi_lambda = gamma_lambda / Z_lambda`` with ``F = log Z_lambda``
    (the Langevin part of the chain leaves ``pi_lambda`` invariant). ``F(1)`` estimates log Z (``log_z_nets``).

    Each optimiser step:

    1. draw ``b`` forward paths of the current drift, detached (the residual's points; any full-support law works);
    2. pick ``S`` states per path at random steps ``k`` (``s = k/K``);
    3. ``loss = mean R^2`` there, ``div c`` exact (``dim <= exact_divergence_max``) or Hutchinson's, ``dF/dt`` by
       autograd in ``s``; differentiated: ``c`` (with its divergence) and ``F``; step.

    Args (besides :class:`~iif.methods.annealed.AnnealedTransport`'s):
        loss_steps: ``S``; exact_divergence_max: the largest dimension with the exact divergence.
    """

    def __init__(self, *args, loss_steps: int = 8, exact_divergence_max: int = 16, **kwargs):
        super().__init__(*args, **kwargs)
        if not 1 <= loss_steps <= self.chain.n_steps + 1:
            raise ValueError(f"method.loss_steps must lie in [1, {self.chain.n_steps + 1}] (the chain's states), got "
                             f"{loss_steps}")
        self.loss_steps, self.exact_divergence_max = loss_steps, exact_divergence_max

    def residual(self, x, s):
        """``R(x, s) [B]`` at states ``x [B, D]`` and times ``s [B]``, with a graph to ``c`` and ``F``."""
        x = x.detach().requires_grad_(True)
        s = s.detach().requires_grad_(True)
        with torch.enable_grad():
            c = self.guidance(x, s.detach())
            div = divergence(c, x, self.exact_divergence_max)
            (dF_ds,) = torch.autograd.grad(self.guidance.free_energy(s).sum(), s, create_graph=True)
        return self.chain.residual(self.base, self.reward, x.detach(), s.detach(), c, div,
                                   dF_ds / self.chain.horizon)

    def log_z_estimates(self, n: int) -> dict[str, float]:
        """``log_z_nets = F(1)``, the learned free energy at the tilt (needs no paths)."""
        return {"log_z_nets": self.log_z_estimate()}

    def fit_step(self, iteration: int) -> dict[str, float]:
        losses, norms = [], []
        b, n_states = self.batch_size, self.chain.n_steps + 1
        for _ in range(self.grad_steps):
            # 1. detached paths
            states = self.on_policy_paths()
            # 2. S states per path at random steps
            idx = torch.rand(b, n_states, device=states.device).argsort(dim=1)[:, : self.loss_steps]  # [b, S]
            cols = torch.arange(b, device=idx.device)[:, None].expand_as(idx)
            x = states[idx, cols].reshape(b * self.loss_steps, *states.shape[2:])
            s = idx.reshape(-1).to(x.dtype) / self.chain.n_steps
            # 3. PINN loss, step
            loss = (self.residual(x, s) ** 2).mean()
            norms.append(self.trainer.minimise(loss))
            losses.append(loss.item())
        n = len(losses)
        return {"loss": sum(losses) / n, "log_z_nets": self.log_z_estimate(), "grad_norm": sum(norms) / n,
                "lr": self.trainer.lr}
