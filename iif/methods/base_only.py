"""``base``: the pretrained model, no fine-tuning (the reference row of every table)."""
from __future__ import annotations

from iif.methods.base import Method


class BaseOnly(Method):
    """Samples of the frozen base model; :meth:`fit_step` does nothing. Training-free baselines subclass it."""

    uses_guidance = False

    def fit_step(self, iteration: int) -> dict[str, float]:
        return {}
