"""Fixed (untrained) guidance from the reward gradient: classifier / reward guidance (docs/methods.md §7.1)."""
from __future__ import annotations

import torch

from iif.base_models.base import BaseModel
from iif.guidance.base import Guidance
from iif.rewards.base import Reward

Tensor = torch.Tensor


class RewardGradient(Guidance):
    """``h(x_t, t) = gamma * grad r(x_t) / lambda``: the reward gradient at the noisy state (the toy's reward is
    defined everywhere). One reward gradient per step, no network.

    Args:
        reward: a differentiable reward.
        base: unused (every fixed guidance is built with the same arguments).
        gamma: the guidance scale.
    """

    requires = frozenset({"differentiable_reward"})

    def __init__(self, reward: Reward, base: BaseModel | None = None, gamma: float = 1.0):
        super().__init__()
        self.reward, self.gamma = reward, float(gamma)

    def forward(self, x: Tensor, t: Tensor, x0_hat: Tensor, cond: Tensor | None = None) -> Tensor:
        return self.gamma * self.reward.grad_log_tilt(x, cond).to(x.dtype)


class ReconstructionGuidance(Guidance):
    """``h(x_t, t) = gamma * grad_{x_t} r(x0_hat(x_t, t)) / lambda``: the Tweedie ("reconstruction guidance")
    variant, differentiating through the frozen base model (one extra base evaluation with a backward per step).

    Args:
        reward: a differentiable reward.
        base: the frozen base model whose Tweedie estimate is differentiated.
        gamma: the guidance scale.
    """

    requires = frozenset({"differentiable_reward"})

    def __init__(self, reward: Reward, base: BaseModel, gamma: float = 1.0):
        super().__init__()
        self.reward, self.gamma = reward, float(gamma)
        self._base = [base]  # not a submodule: the base stays frozen and out of this module's state

    def forward(self, x: Tensor, t: Tensor, x0_hat: Tensor, cond: Tensor | None = None) -> Tensor:
        base = self._base[0]
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            x0 = base.x0_hat(xg, t, base.eps(xg, t, cond))
            (grad,) = torch.autograd.grad(self.reward.log_tilt(x0, cond).sum(), xg)
        return self.gamma * grad.to(x.dtype)
