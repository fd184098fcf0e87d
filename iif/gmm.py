"""Gaussian mixtures in closed form: densities, scores, noising, products (tilting).

Everything here is exact; it is the ground truth the toy experiments are scored against.
Shapes: ``K`` components in ``D`` dimensions; ``weights [K]``, ``means [K, D]``, ``covs [K, D, D]``.
"""
from __future__ import annotations

import copy
import itertools
import math
import torch

Tensor = torch.Tensor


class GMM:
    """A Gaussian mixture ``sum_k w_k N(mu_k, Sigma_k)`` (float64 throughout).

    Args:
        weights: ``[K]`` non-negative, normalised here.
        means: ``[K, D]``.
        covs: ``[K, D, D]`` symmetric positive definite.
    """

    def __init__(self, weights, means, covs):
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.covs = torch.as_tensor(covs, dtype=torch.float64)
        k, d = self.means.shape
        if self.weights.shape != (k,) or self.covs.shape != (k, d, d):
            raise ValueError(f"GMM shapes disagree: weights {tuple(self.weights.shape)}, "
                             f"means {tuple(self.means.shape)}, covs {tuple(self.covs.shape)}")
        if (self.weights < 0).any() or self.weights.sum() <= 0:
            raise ValueError("GMM weights must be non-negative with a positive sum")
        self.weights = self.weights / self.weights.sum()
        self._chol = torch.linalg.cholesky(self.covs)  # raises if a covariance is not SPD
        # fast path: every covariance a multiple of the identity (the toy problem)
        eye = torch.eye(d, dtype=torch.float64)
        diag = torch.diagonal(self.covs, dim1=-2, dim2=-1)[:, :1]  # [K, 1]
        self._iso_var = diag[:, 0] if torch.equal(self.covs, diag[..., None] * eye) else None
        self._copies = {self.means.device: self}  # this mixture on each device it was asked for (see `to`)

    # ----------------------------------------------------------------- constructors
    @classmethod
    def isotropic(cls, means, weights=None, var: float = 1.0) -> "GMM":
        """Mixture with covariance ``var * I`` for every component (equal weights if ``weights`` is None)."""
        means = torch.as_tensor(means, dtype=torch.float64)
        k, d = means.shape
        weights = torch.ones(k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if len(weights) != k:
            raise ValueError(f"{len(weights)} weights for {k} means")
        return cls(weights, means, var * torch.eye(d, dtype=torch.float64).expand(k, d, d).clone())

    @classmethod
    def grid(cls, coords, var: float = 0.1, dim: int = 2) -> "GMM":
        """Equal-weight mixture with one mode at every point of ``coords ** dim`` (a square grid)."""
        means = torch.tensor(list(itertools.product(coords, repeat=dim)), dtype=torch.float64)
        return cls.isotropic(means, var=var)

    def to(self, device: torch.device | str) -> "GMM":
        """This mixture with its tensors on ``device``: ``self`` if it is there, else a copy made once and kept
        (callers that follow their inputs' device, ``gmm.to(x.device)``, pay the transfer once)."""
        device = torch.device(device)
        if device not in self._copies:
            moved = copy.copy(self)  # shares `_copies`: every copy finds the others
            for name in ("weights", "means", "covs", "_chol", "_iso_var"):
                value = getattr(self, name)
                setattr(moved, name, None if value is None else value.to(device))
            self._copies[device] = moved
        return self._copies[device]

    # ----------------------------------------------------------------- properties
    @property
    def n_components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    # ----------------------------------------------------------------- densities
    def component_log_probs(self, x: Tensor) -> Tensor:
        """``log w_k + log N(x; mu_k, Sigma_k)`` for every component: ``x [B, D] -> [B, K]``."""
        x = x.to(torch.float64)
        diff = x[:, None, :] - self.means[None]  # [B, K, D]
        if self._iso_var is not None:
            var = self._iso_var[None]
            return torch.log(self.weights) - 0.5 * ((diff ** 2).sum(-1) / var
                                                    + self.dim * torch.log(2 * math.pi * var))
        sol = torch.linalg.solve_triangular(self._chol[None], diff[..., None], upper=False)[..., 0]
        maha = (sol ** 2).sum(-1)
        logdet = 2 * torch.log(torch.diagonal(self._chol, dim1=-2, dim2=-1)).sum(-1)
        return torch.log(self.weights) - 0.5 * (maha + logdet + self.dim * math.log(2 * math.pi))

    def log_prob(self, x: Tensor) -> Tensor:
        """``log p(x)``: ``[B, D] -> [B]`` (float64)."""
        return torch.logsumexp(self.component_log_probs(x), dim=-1)

    def responsibilities(self, x: Tensor) -> Tensor:
        """Posterior component probabilities ``[B, K]``."""
        return torch.softmax(self.component_log_probs(x), dim=-1)

    def score(self, x: Tensor) -> Tensor:
        """``grad_x log p(x) = sum_k pi_k(x) Sigma_k^{-1} (mu_k - x)``: ``[B, D] -> [B, D]`` (float64)."""
        x = x.to(torch.float64)
        resp = self.responsibilities(x)  # [B, K]
        diff = self.means[None] - x[:, None, :]  # [B, K, D]
        if self._iso_var is not None:
            return (resp[..., None] * diff / self._iso_var[None, :, None]).sum(1)
        prec_diff = torch.cholesky_solve(diff[..., None], self._chol[None])[..., 0]
        return (resp[..., None] * prec_diff).sum(1)

    def noised_score(self, x: Tensor, m: Tensor, v: Tensor) -> Tensor:
        """Score of the noised mixture ``law(m X + v eps)`` with a different ``(m, v)`` per point.

        Args:
            x: ``[B, D]``; m, v: ``[B]``.
        Returns:
            ``[B, D]`` float64: ``sum_k pi_k(x) C_k^{-1} (m mu_k - x)`` with ``C_k = m^2 Sigma_k + v^2 I``.
        """
        x = x.to(torch.float64)
        if self._iso_var is not None:  # C_k = (m^2 s_k + v^2) I, with no [B, K, D] temporaries
            m, v = m.to(torch.float64)[:, None], v.to(torch.float64)[:, None]
            c = m ** 2 * self._iso_var[None] + v ** 2  # [B, K]
            # |m mu_k - x|^2 expanded: float64 keeps the cancellation far below the softmax's resolution
            sq = (m ** 2 * (self.means ** 2).sum(-1)[None] - 2 * m * (x @ self.means.T)
                  + (x ** 2).sum(-1, keepdim=True))  # [B, K]
            logits = torch.log(self.weights)[None] - 0.5 * (sq / c + self.dim * torch.log(c))
            a = torch.softmax(logits, dim=-1) / c  # pi_k(x) / c_k  [B, K]
            return m * (a @ self.means) - a.sum(-1, keepdim=True) * x  # sum_k a_k (m mu_k - x)
        m = m.to(torch.float64)[:, None, None]
        v = v.to(torch.float64)[:, None, None]
        eye = torch.eye(self.dim, dtype=torch.float64, device=x.device)
        covs = m[..., None] ** 2 * self.covs[None] + v[..., None] ** 2 * eye  # [B, K, D, D]
        chol = torch.linalg.cholesky(covs)
        diff = m * self.means[None] - x[:, None, :]  # [B, K, D]
        sol = torch.linalg.solve_triangular(chol, diff[..., None], upper=False)  # [B, K, D, 1]
        logdet = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
        logits = torch.log(self.weights)[None] - 0.5 * ((sol[..., 0] ** 2).sum(-1) + logdet)
        prec_diff = torch.linalg.solve_triangular(chol.transpose(-1, -2), sol, upper=True)[..., 0]
        return (torch.softmax(logits, dim=-1)[..., None] * prec_diff).sum(1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` exact samples ``[n, D]`` (float64)."""
        idx = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=generator, device=self.means.device)
        return self.means[idx] + (self._chol[idx] @ z[..., None])[..., 0]

    # ----------------------------------------------------------------- transformations
    def noised(self, m: float | Tensor, v: float | Tensor) -> "GMM":
        """Law of ``m X + v eps`` with ``X ~ self``, ``eps ~ N(0, I)``: ``sum_k w_k N(m mu_k, m^2 Sigma_k + v^2 I)``."""
        eye = torch.eye(self.dim, dtype=torch.float64, device=self.means.device)
        return GMM(self.weights, m * self.means, m ** 2 * self.covs + v ** 2 * eye)

    def product(self, other: "GMM") -> tuple["GMM", Tensor, Tensor]:
        """Normalised product ``p(x) q(x) / Z`` of two mixtures, which is again a mixture.

        ``N(x; a, A) N(x; b, B) = N(a; b, A + B) N(x; c, C)`` with ``C = (A^-1 + B^-1)^-1``,
        ``c = C (A^-1 a + B^-1 b)``. Components are indexed ``(i, j)`` -> ``i * K_other + j``.

        Returns:
            (mixture, log Z, mode weights ``[K_self]``: the product's mass per component of ``self``).
        """
        a, A = self.means[:, None], self.covs[:, None]  # [K1, 1, D], [K1, 1, D, D]
        b, B = other.means[None], other.covs[None]  # [1, K2, D], [1, K2, D, D]
        Ainv, Binv = torch.linalg.inv(A), torch.linalg.inv(B)
        C = torch.linalg.inv(Ainv + Binv)  # [K1, K2, D, D]
        c = (C @ ((Ainv @ a[..., None]) + (Binv @ b[..., None])))[..., 0]  # [K1, K2, D]
        S = A + B
        diff = (a - b)[..., None]
        L = torch.linalg.cholesky(S)
        sol = torch.linalg.solve_triangular(L, diff, upper=False)[..., 0]
        log_norm = -0.5 * ((sol ** 2).sum(-1) + 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
                           + self.dim * math.log(2 * math.pi))
        log_w = torch.log(self.weights)[:, None] + torch.log(other.weights)[None] + log_norm  # [K1, K2]
        log_z = torch.logsumexp(log_w.reshape(-1), 0)
        mode_weights = torch.exp(torch.logsumexp(log_w, dim=1) - log_z)
        k1, k2 = log_w.shape
        mix = GMM(torch.exp(log_w - log_z).reshape(-1), c.reshape(k1 * k2, self.dim),
                  C.reshape(k1 * k2, self.dim, self.dim))
        return mix, log_z, mode_weights

    def nearest_mode(self, x: Tensor) -> Tensor:
        """Index of the closest component mean for each point: ``[B, D] -> [B]`` (long)."""
        return torch.cdist(x.to(torch.float64), self.means).argmin(dim=1)
