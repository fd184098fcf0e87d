"""``QuadraticEnergy``: a Gaussian ``N(m, P^-1)`` as an energy, everything in closed form."""
from __future__ import annotations

import math

import torch

from iif.energies.base import Energy

Tensor = torch.Tensor


class QuadraticEnergy(Energy):
    """``E(x) = 1/2 (x - m)^T P (x - m)``, ``log Z = D/2 log 2 pi - 1/2 log det P``, samples ``N(m, P^-1)``.

    A single mode: ``modes`` and ``mode_weights`` are None.

    Args:
        mean: ``[D]`` ``m``.
        precision: ``P``, symmetric positive definite: a ``[D, D]`` matrix, a ``[D]`` diagonal, or a scalar
            (times the identity).
    """

    log_z_method = "closed form (D/2 log 2pi - 1/2 log det P)"

    def __init__(self, mean, precision):
        self.mean = torch.as_tensor(mean, dtype=torch.float64)
        if self.mean.dim() != 1:
            raise ValueError(f"reward.energy.mean must be a [D] list, got shape {tuple(self.mean.shape)}")
        d = self.dim = self.mean.shape[0]
        p = torch.as_tensor(precision, dtype=torch.float64)
        p = p * torch.eye(d, dtype=torch.float64, device="cpu") if p.dim() == 0 else torch.diag(p) if p.dim() == 1 else p
        if p.shape != (d, d):
            raise ValueError(f"reward.energy.precision must be a scalar, a [{d}] diagonal or a [{d}, {d}] matrix "
                             f"(D = len(mean) = {d}), got shape {tuple(p.shape)}")
        if not torch.allclose(p, p.T, rtol=1e-12, atol=0.0):
            raise ValueError(f"reward.energy.precision must be symmetric, got {p.tolist()}")
        chol, info = torch.linalg.cholesky_ex(p)
        if info != 0:
            raise ValueError(f"reward.energy.precision must be positive definite, got {p.tolist()} "
                             f"(eigenvalues {torch.linalg.eigvalsh(p).tolist()})")
        self.precision, self._chol = p, chol  # P = L L^T
        logdet = 2 * torch.log(torch.diagonal(chol)).sum().item()
        self.log_z = 0.5 * d * math.log(2 * math.pi) - 0.5 * logdet

    def _energy(self, x: Tensor) -> Tensor:
        diff = x - self.mean.to(x.device)
        return 0.5 * ((diff @ self.precision.to(x.device)) * diff).sum(-1)

    def _grad(self, x: Tensor) -> Tensor:
        """``grad E = P (x - m)``."""
        return (x - self.mean.to(x.device)) @ self.precision.to(x.device)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``m + L^-T z`` with ``P = L L^T``, ``z ~ N(0, I)``: covariance ``L^-T L^-1 = P^-1``."""
        z = torch.randn(n, self.dim, dtype=torch.float64, device="cpu", generator=generator)
        return self.mean + torch.linalg.solve_triangular(self._chol.T, z.T, upper=True).T
