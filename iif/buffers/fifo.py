"""``fifo``: the paper's replay buffer of accepted endpoints (docs/methods.md §5)."""
from __future__ import annotations

import torch

from iif.utils import RunError

Tensor = torch.Tensor


class FIFOBuffer:
    """Fixed-capacity first-in-first-out buffer of samples ``x_0`` and their conditions; uniform minibatches.

    Args:
        capacity: ``B_max``, the most samples kept (the oldest are dropped first).
        prefill: how many base-model samples to put in before the first iteration (0: none).
    """

    def __init__(self, capacity: int = 8192, prefill: int = 4096):
        if capacity < 1:
            raise ValueError(f"buffer.capacity must be >= 1, got {capacity}")
        if not 0 <= prefill <= capacity:
            raise ValueError(f"buffer.prefill must lie in [0, capacity={capacity}], got {prefill}")
        self.capacity, self.prefill = int(capacity), int(prefill)
        self.data: Tensor | None = None
        self.cond: Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.data is None else self.data.shape[0]

    def add(self, x: Tensor, cond: Tensor | None = None) -> None:
        """Append ``x [n, *shape]`` with their conditions ``cond [n, ...]`` (None: unconditional) and drop the oldest
        beyond ``capacity``."""
        if (cond is None) != (self.cond is None) and len(self) > 0:
            raise RunError("the replay buffer holds samples with and without conditions; one run uses one or the other")
        x = x.detach().cpu()
        self.data = x.clone() if self.data is None else torch.cat([self.data, x])
        if cond is not None:
            cond = cond.detach().cpu()
            self.cond = cond.clone() if self.cond is None else torch.cat([self.cond, cond])
        if len(self) > self.capacity:
            self.data = self.data[-self.capacity:].clone()
            self.cond = None if self.cond is None else self.cond[-self.capacity:].clone()

    def sample(self, batch_size: int) -> tuple[Tensor, Tensor | None]:
        """Uniform minibatch (with replacement): samples ``[batch_size, *shape]`` and their conditions (or None)."""
        if len(self) == 0:
            raise RunError("the replay buffer is empty: nothing was accepted and no prefill was configured "
                           "(set buffer.prefill > 0 or raise the acceptance rate)")
        idx = torch.randint(len(self), (batch_size,), device=self.data.device)
        return self.data[idx], (None if self.cond is None else self.cond[idx])

    def state_dict(self) -> dict:
        return {"data": self.data, "cond": self.cond}

    def load_state_dict(self, state: dict) -> None:
        self.data, self.cond = state["data"], state.get("cond")
