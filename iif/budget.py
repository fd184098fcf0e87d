"""The compute budget in method-independent units: base-network evaluations, reward evaluations and reward
gradients, each counted per sample by the base model and the reward themselves. In a run of several processes
(``iif.distributed``) the counts are the sums over the processes."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

from iif.base_models.base import BaseModel
from iif.distributed import world
from iif.rewards.base import Reward


@dataclass
class Budget:
    """Reads and restores the counters of one run's base model and reward."""

    base: BaseModel
    reward: Reward

    def local(self) -> dict[str, int]:
        """This process's counts."""
        return {"base_nfe": self.base.nfe, "reward_evals": self.reward.evals,
                "reward_grad_evals": self.reward.grad_evals}

    def snapshot(self) -> dict[str, int]:
        """The run's counts: summed over its processes (a collective: every process calls it at the same point)."""
        return {k: int(v) for k, v in world().sum(self.local()).items()}

    def restore(self, counts: dict[str, int]) -> None:
        """Set the run's counts (from :meth:`snapshot`): rank 0 holds them and the other processes start from 0, so
        the sums stay right."""
        self._set(counts if world().is_main else dict.fromkeys(counts, 0))

    def _set(self, counts: dict[str, int]) -> None:
        self.base.nfe = int(counts["base_nfe"])
        self.reward.evals = int(counts["reward_evals"])
        self.reward.grad_evals = int(counts["reward_grad_evals"])

    @contextlib.contextmanager
    def uncounted(self):
        """Work that is not part of the method's training budget (evaluation)."""
        saved = self.local()
        try:
            yield
        finally:
            self._set(saved)
