"""The exact tilted target ``p_tilt(x) = p_prior(x) exp(r(x)/lambda) / Z`` of the toy problem.

For a GMM prior and the GMM reward ``r = log q``:

* ``lambda = 1``: ``p_prior q / Z`` is a product of two mixtures, again a mixture (closed form, ``GMM.product``);
* any ``lambda``: per-prior-mode masses ``Z_i = E_{N(mu_i, Sigma_i)}[exp(r/lambda)]`` by tensor-product
  Gauss–Hermite quadrature (exact to rounding for this smooth integrand), and exact samples by choosing a mode
  with probability ``w_i Z_i / Z`` and rejection sampling inside it with the bound ``exp(r_max/lambda)``.
Both routes are implemented; the tests check that they agree at ``lambda = 1``.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from iif.gmm import GMM
from iif.rewards.gmm import GMMReward

Tensor = torch.Tensor


class TiltedGMMTarget:
    """Exact tilted target of a GMM prior under a GMM log-density reward.

    Args:
        prior: ``p_prior``, a mixture whose components define the "modes".
        reward: ``r = log q`` with temperature ``lambda``.
        quadrature_points: Gauss–Hermite points per dimension (used when ``lambda != 1``).
    """

    def __init__(self, prior: GMM, reward: GMMReward, quadrature_points: int = 48):
        if not isinstance(reward, GMMReward):
            raise TypeError(f"the exact toy target needs a GMM reward, got {type(reward).__name__}")
        self.prior, self.reward = prior, reward
        self.lam = reward.temperature
        self.mixture: GMM | None = None
        if self.lam == 1.0:
            self.mixture, self.log_z, self.mode_weights = prior.product(reward.gmm)
        else:
            log_zi = self._quadrature_log_z(quadrature_points)  # [K]
            log_wz = torch.log(prior.weights) + log_zi
            self.log_z = torch.logsumexp(log_wz, 0)
            self.mode_weights = torch.exp(log_wz - self.log_z)
        # upper bound of r on R^D: q(x) <= sum_j w_j max N(.; nu_j, S_j)
        g = reward.gmm
        peak = 0.5 * (g.dim * math.log(2 * math.pi) + torch.logdet(g.covs))
        self.log_q_max = float(torch.logsumexp(torch.log(g.weights) - peak, 0))

    def _quadrature_log_z(self, n: int) -> Tensor:
        """``log E_{N(mu_i, Sigma_i)}[exp(r(x)/lambda)]`` for every prior component: ``[K]``."""
        y, w = np.polynomial.hermite.hermgauss(n)
        d = self.prior.dim
        grids = np.meshgrid(*([y] * d), indexing="ij")
        nodes = torch.tensor(np.stack([g.ravel() for g in grids], -1))  # [n^d, D]
        log_wts = torch.tensor(sum(np.log(np.meshgrid(*([w] * d), indexing="ij")[i]).ravel() for i in range(d)))
        log_wts = log_wts - 0.5 * d * math.log(math.pi)
        chol = torch.linalg.cholesky(self.prior.covs)  # [K, D, D]
        x = self.prior.means[:, None] + math.sqrt(2) * (chol[:, None] @ nodes[None, ..., None])[..., 0]
        log_f = self.reward.gmm.log_prob(x.reshape(-1, d)).reshape(x.shape[:2]) / self.lam
        return torch.logsumexp(log_wts[None] + log_f, dim=1)

    def log_prob(self, x: Tensor) -> Tensor:
        """``log p_tilt(x)``: ``[B, D] -> [B]`` float64."""
        if self.mixture is not None:
            return self.mixture.log_prob(x)
        return self.prior.log_prob(x) + self.reward.gmm.log_prob(x) / self.lam - self.log_z

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` exact samples ``[n, D]`` float64."""
        if self.mixture is not None:
            return self.mixture.sample(n, generator=generator)
        modes = torch.multinomial(self.mode_weights, n, replacement=True, generator=generator)
        out = torch.empty(n, self.prior.dim, dtype=torch.float64)
        todo = torch.arange(n)
        for _ in range(100_000):
            if len(todo) == 0:
                return out
            k = modes[todo]
            z = torch.randn(len(todo), self.prior.dim, dtype=torch.float64, generator=generator)
            x = self.prior.means[k] + (self.prior._chol[k] @ z[..., None])[..., 0]
            log_acc = (self.reward.gmm.log_prob(x) - self.log_q_max) / self.lam
            ok = torch.log(torch.rand(len(todo), dtype=torch.float64, generator=generator)) <= log_acc
            out[todo[ok]] = x[ok]
            todo = todo[~ok]
        raise RuntimeError("rejection sampling of the tilted target did not finish")
