"""The frozen pretrained model that every method fine-tunes or guides."""
from __future__ import annotations

import abc
from typing import ClassVar

import torch
from torch import nn

from iif.schedule import VPSchedule

Tensor = torch.Tensor


class BaseModel(nn.Module, abc.ABC):
    """A frozen noise-prediction model on a VP-SDE.

    Subclasses implement :meth:`predict_eps`; callers use :meth:`eps`, which also counts network evaluations
    (``nfe``, per sample: the method-independent budget). Everything else (score, Tweedie) follows from the schedule:
    ``s(x, t) = -eps(x, t) / v(t)`` and ``x0_hat = (x_t - v(t) eps) / m(t)`` (METHODS.md §0.2).

    Attributes:
        provides: capabilities a method may require: ``"per_step_kernels"`` (Gaussian reverse kernels with a
            known mean and std), ``"differentiable_base"`` (``eps`` is differentiable in ``x`` by autograd, so
            methods can backpropagate through the chain or take vector-Jacobian products of the base drift).
        sample_shape: shape of one sample, e.g. ``(2,)``.
    """

    provides: ClassVar[frozenset[str]] = frozenset({"per_step_kernels", "differentiable_base"})

    def __init__(self, schedule: VPSchedule, sample_shape: tuple[int, ...]):
        super().__init__()
        self.schedule = schedule
        self.sample_shape = tuple(sample_shape)
        self.nfe = 0
        self.device = torch.device("cpu")

    def place(self, device: torch.device) -> "BaseModel":
        """Move the network to ``device``; the sampler draws the prior there (``device`` config key)."""
        self.to(device)
        self.device = torch.device(device)
        return self

    def eps(self, x: Tensor, t: Tensor) -> Tensor:
        """Noise prediction ``eps_theta(x_t, t)``: ``x [B, *shape]``, ``t [B]`` in ``(0, 1]`` -> ``[B, *shape]``."""
        self.nfe += x.shape[0]
        return self.predict_eps(x, t)

    @abc.abstractmethod
    def predict_eps(self, x: Tensor, t: Tensor) -> Tensor:
        """The network (or closed form) behind :meth:`eps`."""

    def prepare(self) -> None:
        """Load or train whatever the model needs (called once, after the config was validated)."""

    def x0_hat(self, x: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """Tweedie estimate ``(x_t - v(t) eps) / m(t)`` with ``t [B]``."""
        shape = (-1,) + (1,) * (x.dim() - 1)
        m = self.schedule.m(t.to(torch.float64)).to(x.dtype).view(shape)
        v = self.schedule.v(t.to(torch.float64)).to(x.dtype).view(shape)
        return (x - v * eps) / m

    def prior_sample(self, n: int) -> Tensor:
        """``x_T ~ N(0, I)``: ``[n, *shape]`` on :attr:`device` (that device's global torch RNG)."""
        return torch.randn(n, *self.sample_shape, device=self.device)
