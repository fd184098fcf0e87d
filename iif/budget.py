"""The compute budget in method-independent units: base-network evaluations, reward evaluations and reward
gradients, each counted per sample by the base model and the reward themselves."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

from iif.base_models.base import BaseModel
from iif.rewards.base import Reward


@dataclass
class Budget:
    """Reads and restores the counters of one run's base model and reward."""

    base: BaseModel
    reward: Reward

    def snapshot(self) -> dict[str, int]:
        return {"base_nfe": self.base.nfe, "reward_evals": self.reward.evals,
                "reward_grad_evals": self.reward.grad_evals}

    def restore(self, counts: dict[str, int]) -> None:
        self.base.nfe = int(counts["base_nfe"])
        self.reward.evals = int(counts["reward_evals"])
        self.reward.grad_evals = int(counts["reward_grad_evals"])

    @contextlib.contextmanager
    def uncounted(self):
        """Work that is not part of the method's training budget (evaluation)."""
        saved = self.snapshot()
        try:
            yield
        finally:
            self.restore(saved)
