"""The shared part of the thermodynamic methods on the reward-annealing path (B) (docs/tilting.md §5): a learned drift
on :class:`~iif.samplers.annealing.RewardAnnealing`, its samples and its forward and reverse works."""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from iif.methods.base import FineTuned
from iif.nn import TimeMLP
from iif.samplers.annealing import RewardAnnealing
from iif.samplers.base import Trajectory

Tensor = torch.Tensor


class AnnealedDrift(nn.Module):
    """The learned transport ``c(x, s)`` of path (B) (the run's guidance network, called with ``x0_hat = x``: there is
    no Tweedie estimate in data space) and a free energy ``F(s) = s phi(s)`` (``F(0) = 0``; ``F(1)`` estimates log Z;
    NETS fits it, CMCD leaves it alone)."""

    def __init__(self, control: nn.Module, hidden: int = 64):
        super().__init__()
        self.control = control
        self.phi = TimeMLP(0, 1, hidden=hidden, layers=2, t_dim=16, zero_init=True, t_scale=10.0)

    def free_energy(self, s: Tensor) -> Tensor:
        """``F(s) [B]`` for ``s [B]``."""
        return s * self.phi(s.new_zeros(s.shape[0], 0), s)[:, 0]

    def forward(self, x: Tensor, s: Tensor) -> Tensor:
        return self.control(x, s, x, None)


class AnnealedTransport(FineTuned):
    """A method that samples by the controlled annealed Langevin chain of path (B) with its learned drift.

    Samples: ``x_K`` of the forward chain (EMA weights if enabled). Their trajectories carry the path work as
    ``log_backward = A - log gamma_1(x_K)`` with ``log_rnd = 0`` (the method's own law is its reference), so the
    evaluators' forward works ``log gamma + log_rnd + log_backward`` are ``A``; reverse works run the backward chain
    from exact target samples (:meth:`reverse_log_weights`). ``nfe`` counts the reward (energy) gradients per sample.
    The run's ``sampler`` is not used: the chain is ``method.chain``.

    Args:
        chain: the path (B) chain (:class:`~iif.samplers.annealing.RewardAnnealing`).
        batch_size, grad_steps: paths per optimiser step and optimiser steps per iteration.
        free_energy_hidden: width of ``F``'s network.
        optimizer, iterations, lr_final_factor, grad_clip, ema_decay: see ``iif.methods.optim.Trainer``.
    """

    requires = frozenset({"differentiable_reward"})
    min_batch: ClassVar[int] = 1

    def __init__(self, base, reward, sampler, guidance, buffer=None, conditions=None, *, chain: RewardAnnealing,
                 batch_size: int = 256, grad_steps: int = 10, free_energy_hidden: int = 64, optimizer=None,
                 iterations: int = 1, lr_final_factor: float = 1.0, grad_clip: float = 0.0, ema_decay: float = 0.0):
        if batch_size < self.min_batch or grad_steps < 1:
            raise ValueError(f"method.batch_size must be >= {self.min_batch} and grad_steps >= 1, got {batch_size}, "
                             f"{grad_steps}")
        RewardAnnealing.check(base)
        super().__init__(base, reward, sampler, AnnealedDrift(guidance, free_energy_hidden).to(base.device),
                         buffer, conditions, optimizer=optimizer, total_steps=iterations * grad_steps,
                         lr_final_factor=lr_final_factor, grad_clip=grad_clip, ema_decay=ema_decay)
        self.chain, self.batch_size, self.grad_steps = chain, batch_size, grad_steps

    def sample(self, n: int, cond: Tensor | None = None) -> Trajectory:
        with self.trainer.sampling_weights():
            x, work, _ = self.chain.forward(self.base, self.reward, self.guidance, n)
        zeros = torch.zeros(n, dtype=torch.float64, device=x.device)
        log_gamma = self.chain.log_gamma(self.base, self.reward, x, 1.0)
        return Trajectory(x0=x, log_rnd=zeros, control_cost=zeros, nfe=self.chain.n_steps,
                          log_backward=work - log_gamma)

    def path_log_prob(self, states: Tensor, cond: Tensor | None = None) -> None:
        return None  # the chain's paths are not diffusion paths; reverse works come from reverse_log_weights

    @torch.no_grad()
    def reverse_log_weights(self, x0: Tensor) -> Tensor:
        """``A - log gamma_1(x_K)`` of backward paths of the chain from ``x_K = x0``."""
        with self.trainer.sampling_weights():
            work = self.chain.backward(self.base, self.reward, self.guidance, x0)
        return (work - self.chain.log_gamma(self.base, self.reward, x0, 1.0)).cpu()

    def on_policy_paths(self) -> Tensor:
        """``[K+1, b, D]`` detached paths of the current drift (the training weights)."""
        return self.chain.forward(self.base, self.reward, self.guidance, self.batch_size, keep_states=True)[2]

    def log_z_estimate(self) -> float:
        """``F(1)``."""
        with torch.no_grad():
            return self.guidance.free_energy(torch.ones(1, device=self.base.device)).item()
