"""Rewards ``r(x)`` and the tilt ``r(x) / lambda`` (docs/methods.md §0.3)."""
from __future__ import annotations

import abc
from typing import ClassVar

import torch

from iif.utils import RunError

Tensor = torch.Tensor


class RewardError(RunError):
    """A reward returned values that cannot be used (NaN or infinite); ``iif-train`` reports it as one line."""


class Reward(abc.ABC):
    """A reward on clean samples ``x [B, *shape]``, with an optional per-sample condition ``cond [B, ...]`` (class
    label, prompt index, measurement ``y``).

    Subclasses implement :meth:`evaluate` (the raw reward) and may override :meth:`_grad` (default: autograd).
    Callers use ``reward(x, cond)``, :meth:`log_tilt` (the exponent of ``p_tilt ∝ p_data exp(r / lambda)``) and
    :meth:`grad_log_tilt`, which count evaluations (``evals``, ``grad_evals``, per sample) for the budget.

    Args:
        temperature: ``lambda > 0``.
        name: shown in error messages.

    Attributes:
        differentiable: whether :meth:`grad_log_tilt` is available.
    """

    differentiable: ClassVar[bool] = True

    def __init__(self, temperature: float = 1.0, name: str | None = None):
        if not temperature > 0:
            raise ValueError(f"reward temperature lambda must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.name = name or type(self).__name__
        self.evals = self.grad_evals = 0

    def place(self, device: torch.device) -> "Reward":
        """Move the reward's networks to ``device`` (before :meth:`prepare`, so a classifier pretrains there);
        returns ``self``. A reward without networks has nothing to move."""
        return self

    def prepare(self) -> None:
        """Load or train what the reward needs (a classifier's pretraining; called once, after the config was
        validated, like the base model's)."""

    def __call__(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        """Raw reward ``r(x | cond)``: ``[B, *shape] -> [B]``."""
        self.evals += x.shape[0]
        return self.evaluate(x, cond)

    @abc.abstractmethod
    def evaluate(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        """The reward behind :meth:`__call__`: ``x [B, *shape]``, ``cond [B, ...]`` or None -> ``[B]``."""

    def log_tilt(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        """``r(x | cond) / lambda`` ``[B]``, checked finite (a NaN here would silently poison the weights)."""
        r = self(x, cond)
        bad = ~torch.isfinite(r)
        if bad.any():
            diverged = int((~torch.isfinite(x.flatten(1)).all(1)).sum())
            cause = (f": {diverged} of its inputs are non-finite already, so the samples diverged before the reward "
                     "(a drift too stiff for the sampler's step: raise sampler.n_steps, or lower the method's learning "
                     "rate)" if diverged else f"; first bad input: {x[bad][0].tolist()}")
            raise RewardError(f"reward '{self.name}' returned {int(bad.sum())} non-finite values "
                              f"(NaN/inf) out of {r.numel()}{cause}")
        return r / self.temperature

    def grad_log_tilt(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        """``grad_x r(x | cond) / lambda`` ``[B, *shape]``; differentiable itself only where ``x`` carries a graph
        (e.g. the pathwise method differentiates through ``h(x_t, t, grad r(x0_hat(x_t)))``)."""
        if not self.differentiable:
            raise TypeError(f"reward '{self.name}' is not differentiable")
        self.grad_evals += x.shape[0]
        return self._grad(x, cond) / self.temperature

    def _grad(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        """``grad_x r(x | cond)`` (autograd of :meth:`evaluate`; override with a closed form where there is one)."""
        if torch.is_grad_enabled() and x.requires_grad:  # part of a differentiated computation: keep the graph
            (g,) = torch.autograd.grad(self.evaluate(x, cond).sum(), x, create_graph=True)
            return g
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.evaluate(x, cond).sum(), x)
        return g

    def log_tilt_autograd(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        """``r(x) / lambda`` ``[B]`` with a first-order autograd graph to ``x`` whose backward is
        :meth:`grad_log_tilt`, so that a method backpropagating through the reward is charged for the gradient
        evaluations like any other (the budget's ``reward_grad_evals``)."""
        return _CountedLogTilt.apply(x, self, cond)


class _CountedLogTilt(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, reward: Reward, cond: Tensor | None) -> Tensor:
        ctx.reward, ctx.cond = reward, cond
        ctx.save_for_backward(x)
        return reward.log_tilt(x.detach(), cond)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (x,) = ctx.saved_tensors
        g = ctx.reward.grad_log_tilt(x.detach(), ctx.cond)
        return grad_out.reshape((-1,) + (1,) * (g.dim() - 1)) * g, None, None
