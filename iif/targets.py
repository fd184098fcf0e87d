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

    def _mode_proposal(self, i: int):
        """Rejection sampler of ``N(mu_i, Sigma_i) q^p`` (``p = 1/lambda``): (proposal, log acceptance ratio, log rate).

        ``p >= 1``: by Jensen ``q^p = (sum_j w_j N_j)^p <= sum_j w_j N_j^p``, and ``N(.; nu, S)^p = c N(.; nu, S/p)``
        with ``c = (2 pi)^(-d(p-1)/2) |S|^(-(p-1)/2) p^(-d/2)``, so the envelope ``N(mu_i, Sigma_i) sum_j w_j N_j^p``
        is a Gaussian mixture (a product, :meth:`GMM.product`) and the ratio ``q^p / sum_j w_j N_j^p <= 1``.
        ``p < 1``: propose from ``N(mu_i, Sigma_i)``, accept w.p. ``(q / q_max)^p``.
        """
        p, g = 1.0 / self.lam, self.reward.gmm
        comp = GMM(torch.ones(1), self.prior.means[i:i + 1], self.prior.covs[i:i + 1])
        log_zi = torch.log(self.mode_weights[i]) + self.log_z - torch.log(self.prior.weights[i])
        if p < 1:
            return comp, lambda x: p * (g.log_prob(x) - self.log_q_max), float(log_zi - p * self.log_q_max)
        d = g.dim
        log_c = (-0.5 * d * (p - 1) * math.log(2 * math.pi) - 0.5 * (p - 1) * torch.logdet(g.covs)
                 - 0.5 * d * math.log(p))
        log_env_w = torch.log(g.weights) + log_c  # sum_j w_j N_j^p = sum_j exp(log_env_w_j) N(nu_j, S_j / p)
        envelope = GMM(torch.exp(log_env_w - log_env_w.max()), g.means, g.covs / p)  # GMM normalises weights
        proposal, log_z_env, _ = comp.product(envelope)
        log_z_env = log_z_env + torch.logsumexp(log_env_w, 0)  # mass of N_i * sum_j w_j N_j^p

        def log_ratio(x: Tensor) -> Tensor:
            log_nj = g.component_log_probs(x) - torch.log(g.weights)  # [B, J]: log N_j(x)
            return p * g.log_prob(x) - torch.logsumexp(torch.log(g.weights) + p * log_nj, dim=1)

        return proposal, log_ratio, float(log_zi - log_z_env)

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
        for i in torch.unique(modes).tolist():
            slots = torch.nonzero(modes == i)[:, 0]
            proposal, log_ratio, log_rate = self._mode_proposal(i)
            per = int(min(max(2.0 * math.exp(-log_rate), 1.0), 1e6))  # proposals per missing sample
            filled = 0
            for _ in range(10_000):
                need = len(slots) - filled
                if need == 0:
                    break
                m = min(need * per, 2_000_000)
                x = proposal.sample(m, generator=generator)
                u = torch.rand(m, dtype=torch.float64, generator=generator)
                ok = x[torch.log(u) <= log_ratio(x)][:need]
                out[slots[filled:filled + len(ok)]] = ok
                filled += len(ok)
            else:
                raise RuntimeError("rejection sampling of the tilted target did not finish")
        return out
