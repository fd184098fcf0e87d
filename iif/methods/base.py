"""The small base class every method implements."""
from __future__ import annotations

import abc
from typing import ClassVar

import torch

from iif.base_models.base import BaseModel
from iif.conditions.base import ConditionSource, Unconditional
from iif.distributed import world
from iif.guidance.base import Guidance
from iif.methods.optim import Trainer
from iif.rewards.base import Reward
from iif.samplers.base import Trajectory

Tensor = torch.Tensor


class Method(abc.ABC):
    """A way to turn a frozen base model and a reward into samples of the tilted target.

    Every method is built with the same shared components; the training loop (``iif.train``) calls
    :meth:`setup` once on a fresh run, :meth:`fit_step` once per iteration, and :meth:`sample` to evaluate.
    ``conditions`` draws the condition of every trajectory the method samples (class, prompt, measurement; the
    default: unconditional).

    Attributes:
        requires: capabilities the method needs from the other components (checked at start-up).
        uses_guidance: whether the ``guidance`` component is part of this method (its requirements then apply).
        data_parallel: whether one run of the method can span several processes (``iif.distributed``).
    """

    requires: ClassVar[frozenset[str]] = frozenset()
    uses_guidance: ClassVar[bool] = True
    data_parallel: ClassVar[bool] = False

    def __init__(self, base: BaseModel, reward: Reward, sampler, guidance: Guidance | None = None, buffer=None,
                 conditions: ConditionSource | None = None):
        self.base, self.reward, self.sampler = base, reward, sampler
        self.guidance = guidance if self.uses_guidance else None
        self.buffer = buffer
        self.conditions = conditions or Unconditional()

    def setup(self) -> None:
        """Work done once at the start of a fresh (not resumed) run, e.g. pre-filling a buffer."""

    @abc.abstractmethod
    def fit_step(self, iteration: int) -> dict[str, float]:
        """One outer iteration; returns scalars to log."""

    def sample(self, n: int, cond: Tensor | None = None) -> Trajectory:
        """``n`` samples of the current model with their path statistics; ``cond [n, ...]`` (default: drawn from
        :attr:`conditions`)."""
        return self.sampler.sample(self.base, self.guidance, n, cond=self.conditions_for(n, cond))

    def path_log_prob(self, states: Tensor, cond: Tensor | None = None) -> Tensor | None:
        """``log P(x_{0:N})`` ``[B]`` of given paths ``states [N+1, B, *shape]`` (``x_N..x_0``) under the law the
        method samples from (Crooks' reverse works, ``iif.metrics.works``); None for a method whose samples are not
        the endpoints of one diffusion path (best-of-K)."""
        return self.sampler.path_log_prob(self.base, self.guidance, states, cond)

    @torch.no_grad()
    def reverse_log_weights(self, x0: Tensor) -> Tensor | None:
        """``log B(x_{1:N} | x_0) - log P(x_{0:N})`` ``[B]`` float64 of reverse paths drawn from the backward process
        ``B`` started at given clean samples ``x0 [B, *shape]`` (exact target samples: Crooks' reverse works,
        ``iif.metrics.works``). Here ``B`` is the base path's noising chain and ``P`` :meth:`path_log_prob`'s law;
        None where the method has no path density."""
        if any(k.std == 0 for k in self.sampler.kernels(self.base)):
            return None
        states, log_q = self.sampler.noising_path(self.base, x0)
        log_p = self.path_log_prob(states)
        return None if log_p is None else log_q.cpu() - log_p.cpu()

    def log_z_estimates(self, n: int) -> dict[str, float]:
        """The method's own estimates of ``log Z``, named ``log_z_<estimator>`` (with any diagnostics), from ``n``
        fresh paths where they need some: e.g. NETS' free energy and its escorted works. The path works' Jarzynski,
        Crooks and BAR estimates, which every method with a path density has, are the evaluators'. None here."""
        return {}

    def conditions_for(self, n: int, cond: Tensor | None = None) -> Tensor | None:
        """``cond`` on the base's device, or ``n`` conditions drawn from :attr:`conditions`."""
        cond = self.conditions.sample(n) if cond is None else cond
        return None if cond is None else cond.to(self.base.device)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class FineTuned(Method):
    """A method that trains the guidance ``h`` (the h-transform / control) of the frozen base.

    Holds the :class:`~iif.methods.optim.Trainer` of ``h``; sampling uses its EMA weights when enabled.

    Args:
        optimizer: a partially-applied ``torch.optim`` class; total_steps: optimiser steps of the whole run
            (the cosine learning-rate decay spans them); lr_final_factor, grad_clip, ema_decay: see ``Trainer``.
    """

    def __init__(self, base, reward, sampler, guidance, buffer=None, conditions=None, *, optimizer=None,
                 total_steps: int = 1, lr_final_factor: float = 1.0, grad_clip: float = 0.0, ema_decay: float = 0.0):
        super().__init__(base, reward, sampler, guidance, buffer, conditions)
        self.trainer = Trainer(self.guidance, optimizer, total_steps=total_steps, lr_final_factor=lr_final_factor,
                               grad_clip=grad_clip, ema_decay=ema_decay)

    def sample(self, n: int, cond: Tensor | None = None) -> Trajectory:
        """``n`` samples of the current ``h`` (EMA weights if enabled); in a run of several processes each runs its
        share of the rows and every process gets all ``n``."""
        ranks = world()
        cond = self.conditions_for(n, cond)
        with self.trainer.sampling_weights():
            if ranks.size == 1:
                return super().sample(n, cond)
            traj = self.sampler.sample(self.base, self.guidance, n, cond=cond, rows=ranks.shard(n))
        return Trajectory(x0=ranks.gather(traj.x0, n), log_rnd=ranks.gather(traj.log_rnd, n),
                          control_cost=ranks.gather(traj.control_cost, n), cond=cond, nfe=traj.nfe)

    def path_log_prob(self, states: Tensor, cond: Tensor | None = None) -> Tensor | None:
        """The path density of the sampling weights (EMA if enabled)."""
        with self.trainer.sampling_weights():
            return super().path_log_prob(states, cond)

    def state_dict(self) -> dict:
        return {"trainer": self.trainer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.trainer.load_state_dict(state["trainer"])
