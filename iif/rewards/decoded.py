"""A reward on pixels seen from a latent model: ``r(decode(z) | cond)`` (methods see latents, rewards see pixels)."""
from __future__ import annotations

import torch

from iif.rewards.base import Reward

Tensor = torch.Tensor


class DecodedReward(Reward):
    """``r(decode(z))`` for latents ``z``; its gradient goes through the decoder by autograd.

    The training loop wraps the configured reward in it when the base model is a latent model (``base.latent``);
    evaluations are counted here and by the pixel reward alike (one each).

    Args:
        reward: the reward on decoded samples.
        decode: ``z [B, *latent_shape] -> x [B, *pixel_shape]``, differentiable.
    """

    def __init__(self, reward: Reward, decode):
        super().__init__(temperature=reward.temperature, name=f"{reward.name} (decoded)")
        self.inner, self.decode = reward, decode
        self.differentiable = reward.differentiable

    def place(self, device: torch.device) -> "DecodedReward":
        self.inner.place(device)
        return self

    def prepare(self) -> None:
        self.inner.prepare()

    def evaluate(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        return self.inner.evaluate(self.decode(x), cond)
