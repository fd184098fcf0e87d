"""``cg``: classifier / reward guidance, no training (docs/methods.md §7.1). The base chain is guided by a fixed
``h = gamma * grad r`` (at ``x_t``, or through Tweedie with ``method=cg_tweedie``)."""
from __future__ import annotations

from iif.methods.base_only import BaseOnly


class ClassifierGuidance(BaseOnly):
    """Inference-time guidance by the reward gradient.

    Args:
        guide: a partially-applied fixed guidance (``iif.guidance.reward_gradient``), called with
            ``reward=`` and ``base=``; its ``gamma`` is the guidance scale.
    """

    requires = frozenset({"differentiable_reward"})

    def __init__(self, base, reward, sampler, guidance=None, buffer=None, conditions=None, *, guide):
        super().__init__(base, reward, sampler, guidance, buffer, conditions)
        self.guide = guide(reward=reward, base=base)

    def sample(self, n: int, cond=None):
        return self.sampler.sample(self.base, self.guide, n, cond=self.conditions_for(n, cond))

    def path_log_prob(self, states, cond=None):
        return self.sampler.path_log_prob(self.base, self.guide, states, cond)
