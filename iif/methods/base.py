"""The small base class every method implements."""
from __future__ import annotations

import abc
from typing import ClassVar

import torch

from iif.base_models.base import BaseModel
from iif.guidance.base import Guidance
from iif.rewards.base import Reward
from iif.samplers.base import Trajectory

Tensor = torch.Tensor


class Method(abc.ABC):
    """A way to turn a frozen base model and a reward into samples of the tilted target.

    Every method is built with the same shared components; the training loop (``iif.train``) calls
    :meth:`setup` once on a fresh run, :meth:`fit_step` once per iteration, and :meth:`sample` to evaluate.

    Attributes:
        requires: capabilities the method needs from the other components (checked at start-up).
        uses_guidance: whether the ``guidance`` component is part of this method (its requirements then apply).
    """

    requires: ClassVar[frozenset[str]] = frozenset()
    uses_guidance: ClassVar[bool] = True

    def __init__(self, base: BaseModel, reward: Reward, sampler, guidance: Guidance | None = None, buffer=None):
        self.base, self.reward, self.sampler = base, reward, sampler
        self.guidance = guidance if self.uses_guidance else None
        self.buffer = buffer

    def setup(self) -> None:
        """Work done once at the start of a fresh (not resumed) run, e.g. pre-filling a buffer."""

    @abc.abstractmethod
    def fit_step(self, iteration: int) -> dict[str, float]:
        """One outer iteration; returns scalars to log."""

    def sample(self, n: int) -> Trajectory:
        """``n`` samples of the current model with their path statistics."""
        return self.sampler.sample(self.base, self.guidance, n)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
