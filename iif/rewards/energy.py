"""``energy``: the reward that turns sampling from ``exp(-E) / Z`` into tilting the base model (the sampling special
case of docs/methods.md): ``r(x) = -E(x) - log p_base(x)``."""
from __future__ import annotations

import torch

from iif.energies.base import Energy
from iif.gmm import GMM
from iif.rewards.base import Reward

Tensor = torch.Tensor


class EnergyReward(Reward):
    """``r(x) = -E(x) - log p_base(x)``, so that ``p_base(x) exp(r(x)) = exp(-E(x))`` and
    ``Z = E_{p_base}[exp r] = int exp(-E) = exp(energy.log_z)``.

    At ``temperature`` 1 the tilted base ``p_base exp(r / lambda) / Z`` is the energy's density; other temperatures
    tilt towards ``p_base^(1 - 1/lambda) exp(-E / lambda)`` instead.

    Args:
        energy: the target's energy ``E`` (its ``log_z``, samples and modes are the evaluator's ground truth).
        base: ``p_base``, the base model's data distribution (the run's ``prior``), ``dim`` equal to the energy's.
        temperature: ``lambda``.
        name: shown in error messages.
    """

    def __init__(self, energy: Energy, base: GMM, temperature: float = 1.0, name: str = "energy"):
        super().__init__(temperature=temperature, name=name)
        if energy.dim != base.dim:
            raise ValueError(f"reward.energy has dimension {energy.dim} but the base distribution (prior) has "
                             f"{base.dim}: r = -E - log p_base needs both on the same space")
        self.energy = energy
        self.base = base

    def evaluate(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        """``-E(x) - log p_base(x)``: ``[B, D] -> [B]`` (float64 inside, ``x``'s dtype out)."""
        x64 = x.to(torch.float64)
        return (-self.energy(x64) - self.base.to(x.device).log_prob(x64)).to(x.dtype)

    def _grad(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        """Closed form ``-grad E(x) - grad log p_base(x)``: ``[B, D] -> [B, D]``."""
        x64 = x.to(torch.float64)
        return (-self.energy.grad(x64) - self.base.to(x.device).score(x64)).to(x.dtype)
