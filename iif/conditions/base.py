"""Where the conditions of the samples come from (config group ``conditions``): a class label, a prompt, a
measurement. A condition is a tensor ``[B, ...]`` with one row per sample, so it is sharded, gathered, stored in the
replay buffer and checkpointed like the samples themselves; the base model, the guidance and the reward interpret it.
"""
from __future__ import annotations

import abc
from typing import Callable

import torch

Tensor = torch.Tensor


class ConditionSource(abc.ABC):
    """Draws the conditions of ``n`` samples from the global torch RNG (the run's shared random stream)."""

    @abc.abstractmethod
    def sample(self, n: int) -> Tensor | None:
        """``[n, ...]`` conditions, or None for unconditional sampling."""

    def bind(self, base, sampler) -> None:
        """Receive the run's base model and sampler (a source that simulates from the model, e.g. measurements)."""

    def base_pairs(self, n: int, draw: Callable[[Tensor | None], Tensor]) -> tuple[Tensor, Tensor | None]:
        """``n`` pairs (base sample ``x_0 [n, *shape]``, condition ``[n, ...]``) for a replay buffer's prefill, with
        ``draw(cond) -> x_0`` the frozen base's unguided sampler. Here: the conditions first, then the base under
        them (a conditional base, e.g. prompts: ``x_0 ~ p(x | c)``)."""
        cond = self.sample(n)
        return draw(cond), cond

    def feature_dim(self, sample_shape: tuple[int, ...]) -> int:
        """``F``, the width of :meth:`features` for samples of shape ``sample_shape`` (``(C, H, W)``, ``(d,)``);
        0: the conditions carry no features (unconditional)."""
        return 0

    def features(self, cond: Tensor | None) -> Tensor | None:
        """``[B, F]`` float32 features of a batch of conditions ``cond [B, ...]``, on ``cond``'s device, for a
        network that takes the condition as a flat input (DPOK's value network); None when :meth:`feature_dim` is 0."""
        return None


class Unconditional(ConditionSource):
    """``none``: no condition (the toy problems)."""

    def sample(self, n: int) -> None:
        return None
