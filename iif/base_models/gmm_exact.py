"""``gmm_exact``: the analytic base model of the toy problem.

The data law is a Gaussian mixture, so every noised marginal ``p_t = sum_k w_k N(m mu_k, m^2 Sigma_k + v^2 I)``
and its score are closed-form; ``eps(x, t) = -v(t) grad log p_t(x)``. Fine-tuning error is then measured
without any base-model error.
"""
from __future__ import annotations

import torch

from iif.base_models.base import BaseModel
from iif.gmm import GMM
from iif.schedule import VPSchedule

Tensor = torch.Tensor


class GMMExact(BaseModel):
    """Exact noise prediction for GMM data.

    Args:
        prior: the data mixture ``p_data``.
        schedule: the VP-SDE.
    """

    def __init__(self, prior: GMM, schedule: VPSchedule):
        super().__init__(schedule, (prior.dim,))
        self.prior = prior

    def predict_eps(self, x: Tensor, t: Tensor) -> Tensor:
        t64 = t.to(torch.float64)
        m, v = self.schedule.m(t64), self.schedule.v(t64)
        return (-v[:, None] * self.prior.to(x.device).noised_score(x, m, v)).to(x.dtype)
