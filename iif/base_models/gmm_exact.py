"""``gmm_exact``: the analytic base model of the toy problem.

The data law is a Gaussian mixture, so every noised marginal ``p_t = sum_k w_k N(alpha mu_k, alpha^2 Sigma_k + sigma^2 I)``
and its score are closed-form; ``eps(x, t) = -sigma(t) grad log p_t(x)``. Fine-tuning error is then measured
without any base-model error.
"""
from __future__ import annotations

import torch

from iif.base_models.base import BaseModel
from iif.gmm import GMM
from iif.schedules.base import GaussianPath

Tensor = torch.Tensor


class GMMExact(BaseModel):
    """Exact noise prediction for GMM data.

    Args:
        prior: the data mixture ``p_data``.
        schedule: the Gaussian path.
    """

    def __init__(self, prior: GMM, schedule: GaussianPath):
        super().__init__(schedule, (prior.dim,))
        self.prior = prior

    def data_score(self, x: Tensor, cond: Tensor | None = None, t_min: float = 0.0) -> Tensor:
        """Exact ``grad log p_data(x)`` (the mixture's score)."""
        return self.prior.to(x.device).score(x).to(x.dtype)

    def data_log_prob(self, x: Tensor) -> Tensor:
        """``log p_data(x)`` ``[B]`` float64 (the path works of CMCD and the evaluators need it)."""
        return self.prior.to(x.device).log_prob(x.to(torch.float64))

    @property
    def gaussian(self) -> bool:
        """Whether the data law is one Gaussian: every kernel of a chain on it is then affine in ``x`` (adjoint
        sampling transports its adjoint in closed form)."""
        return self.prior.n_components == 1

    def predict(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        t64 = t.to(torch.float64)
        m, v = self.schedule.alpha(t64), self.schedule.sigma(t64)
        return (-v[:, None] * self.prior.to(x.device).noised_score(x, m, v)).to(x.dtype)
