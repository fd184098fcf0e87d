"""``gmm``: the toy reward ``r(x) = log q(x)``, the log-density of a Gaussian mixture (docs/methods.md §8.1)."""
from __future__ import annotations

import torch

from iif.gmm import GMM
from iif.rewards.base import Reward

Tensor = torch.Tensor


class GMMReward(Reward):
    """``r(x) = log q(x)`` with ``q = sum_j w_j N(mu_j, var I)``.

    Args:
        means: ``[J, D]`` component means.
        weights: ``[J]`` (normalised).
        var: isotropic component variance.
        temperature: ``lambda``.
    """

    def __init__(self, means, weights, var: float = 1.0, temperature: float = 1.0, name: str = "gmm"):
        super().__init__(temperature=temperature, name=name)
        self.gmm = GMM.isotropic(means, weights, var=var)

    def evaluate(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        return self.gmm.to(x.device).log_prob(x).to(x.dtype)

    def _grad(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        """Closed form ``grad log q(x)`` (the score of the mixture)."""
        return self.gmm.to(x.device).score(x).to(x.dtype)


class BlackBoxGMMReward(GMMReward):
    """``gmm_blackbox``: the same reward queried by value only, as a black-box reward would be."""

    differentiable = False
