"""``reward_informed``: ``h(x, t) = NN1(x, x0_hat, grad r(x0_hat), t) + NN2(t) * grad r(x0_hat)`` [IIF 16]."""
from __future__ import annotations

import math

import torch

from iif.guidance.base import Guidance
from iif.nn import TimeMLP
from iif.rewards.base import Reward

Tensor = torch.Tensor


class RewardInformedGuidance(Guidance):
    """Reward-informed h-transform (docs/methods.md §4.4).

    ``grad r`` is the gradient of the tilt ``r / lambda`` w.r.t. the clean-sample argument, evaluated at the
    Tweedie estimate ``x0_hat`` of the frozen base (an input feature: IIF and AM evaluate it on detached states;
    only the pathwise method differentiates through it). Both ``NN1`` and ``NN2``
    have zero-initialised last layers, so ``h == 0`` at initialisation: the fine-tuned model starts as the base.

    For flat samples of ``D = prod(base.sample_shape)`` numbers; the condition enters through the reward gradient
    ``grad r(x0_hat | cond)``.

    Args:
        base: the frozen base model (its sample shape).
        reward: the (differentiable) reward.
        hidden, layers, t_dim: size of NN1; NN2 is a 2-layer MLP of the time embedding.
        t_scale: highest frequency of the time embedding (see ``iif.nn.TimeMLP``).
    """

    requires = frozenset({"differentiable_reward"})

    def __init__(self, base, reward: Reward, hidden: int = 128, layers: int = 3, t_dim: int = 32,
                 nn2_hidden: int = 64, t_scale: float = 1000.0):
        super().__init__()
        self.reward = reward
        dim = math.prod(base.sample_shape)
        self.nn1 = TimeMLP(3 * dim, dim, hidden=hidden, layers=layers, t_dim=t_dim, zero_init=True,
                            t_scale=t_scale)
        self.nn2 = TimeMLP(0, 1, hidden=nn2_hidden, layers=2, t_dim=t_dim, zero_init=True, t_scale=t_scale)

    def forward(self, x: Tensor, t: Tensor, x0_hat: Tensor, cond: Tensor | None = None) -> Tensor:
        grad_r = self.reward.grad_log_tilt(x0_hat, cond).to(x.dtype)  # [B, *shape]; a graph only if x0_hat has one
        nn1 = self.nn1(torch.cat([x.flatten(1), x0_hat.flatten(1), grad_r.flatten(1)], dim=-1), t).view(x.shape)
        nn2 = self.nn2(x.new_zeros(x.shape[0], 0), t).view((-1,) + (1,) * (x.dim() - 1))  # [B, 1, ...]
        return nn1 + nn2 * grad_r
