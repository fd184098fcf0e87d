"""``oracle``: the exact optimal h-transform ``h*(x, t) = grad log p^tilt_t(x) - grad log p_t(x)`` for a GMM base
tilted into a GMM target (docs/methods.md §1.1): a diagnostic for the sampler and the fit, not a method."""
from __future__ import annotations

import torch

from iif.gmm import GMM
from iif.guidance.base import Guidance
from iif.schedules.base import GaussianPath

Tensor = torch.Tensor


class ExactTiltGuidance(Guidance):
    """``h*(x, t)`` in closed form from the prior and the tilted target mixtures.

    Args:
        prior: data mixture of the base model.
        tilted: the tilted target as a mixture (``TiltedGMMTarget.mixture``).
        schedule: the VP-SDE.
    """

    def __init__(self, prior: GMM, tilted: GMM, schedule: GaussianPath):
        super().__init__()
        self.prior, self.tilted, self.schedule = prior, tilted, schedule

    def forward(self, x: Tensor, t: Tensor, x0_hat: Tensor, cond: Tensor | None = None) -> Tensor:
        t64 = t.to(torch.float64)
        m, v = self.schedule.alpha(t64), self.schedule.sigma(t64)
        return (self.tilted.noised_score(x, m, v) - self.prior.noised_score(x, m, v)).to(x.dtype)
