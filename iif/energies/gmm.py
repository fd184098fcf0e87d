"""``GMMEnergy``: an isotropic Gaussian mixture as an energy, with a chosen normaliser."""
from __future__ import annotations

import math

import torch

from iif.energies.base import Energy
from iif.gmm import GMM

Tensor = torch.Tensor


class GMMEnergy(Energy):
    """``E(x) = -log sum_k w_k N(x; mu_k, var I) - log_z``, so that ``int exp(-E) = exp(log_z)`` exactly.

    The normaliser is the user's choice (not 0) so that an estimator of ``log Z`` that silently assumes a normalised
    target is caught. Modes are the components: a point belongs to the nearest mean, and ``mode_weights`` are the
    component weights ``w_k``. (The mass of mode ``k``'s nearest-mean cell differs from ``w_k`` by the components'
    overlap, at most ``sum_{j != k} (w_j + w_k) Phi(-|mu_j - mu_k| / (2 sqrt(var)))``: negligible for well separated
    modes: ``Phi(-3.5) = 2.3e-4`` per neighbour 3.5 standard deviations from the cell boundary.)

    Args:
        means: ``[K, D]`` component means.
        weights: ``[K]`` non-negative (normalised here); None: equal.
        var: isotropic component variance, > 0.
        log_z: ``log int exp(-E)``.
    """

    log_z_method = "closed form (the chosen normaliser of a normalised mixture)"

    def __init__(self, means, weights=None, var: float = 1.0, log_z: float = 0.0):
        if not var > 0:
            raise ValueError(f"reward.energy.var must be > 0, got {var}")
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.dim() != 2:
            raise ValueError(f"reward.energy.means must be a [K, D] list of means, got shape {tuple(means.shape)}")
        if weights is not None:
            weights = torch.as_tensor(weights, dtype=torch.float64)
            if weights.shape != (means.shape[0],) or (weights < 0).any() or not weights.sum() > 0:
                raise ValueError(f"reward.energy.weights must be {means.shape[0]} non-negative numbers with a "
                                 f"positive sum (one per mean), got {weights.tolist()}")
        self.gmm = GMM.isotropic(means, weights, var=float(var))
        self.dim = self.gmm.dim
        self.log_z = float(log_z)
        self.modes = self.gmm.means
        self.mode_weights = self.gmm.weights

    @classmethod
    def far_modes(cls, dim: int = 10, n_modes: int = 4, distance: float = 8.0, var: float = 1.0,
                  log_z: float = 0.0) -> "GMMEnergy":
        """``n_modes <= dim`` equidistant modes ``mu_k = (distance / sqrt 2) e_k`` (every pair ``distance`` apart)
        with unequal weights ``w_k ∝ k + 1`` (``0.1, 0.2, 0.3, 0.4`` for 4 modes), so that a mis-weighting of the
        modes is visible in the mode fractions."""
        if not 1 <= n_modes <= dim:
            raise ValueError(f"reward.energy.n_modes must be in [1, dim={dim}] (one mode per coordinate axis), "
                             f"got {n_modes}")
        if not distance > 0:
            raise ValueError(f"reward.energy.distance must be > 0, got {distance}")
        means = torch.zeros(n_modes, dim, dtype=torch.float64, device="cpu")
        means[torch.arange(n_modes), torch.arange(n_modes)] = distance / math.sqrt(2)
        weights = torch.arange(1, n_modes + 1, dtype=torch.float64, device="cpu")
        return cls(means, weights, var=var, log_z=log_z)

    def _energy(self, x: Tensor) -> Tensor:
        return -self.gmm.to(x.device).log_prob(x) - self.log_z

    def _grad(self, x: Tensor) -> Tensor:
        """``grad E = -grad log p`` (minus the mixture's score)."""
        return -self.gmm.to(x.device).score(x)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.gmm.sample(n, generator=generator)

    def mode_of(self, x: Tensor) -> Tensor:
        """Index of the nearest mean: ``[B, D] -> [B]`` long."""
        return self.gmm.to(x.device).nearest_mode(x)
