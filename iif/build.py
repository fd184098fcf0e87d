"""The components of a run, each instantiated from its ``_target_`` in ``conf/`` (cheap: no pretraining, no
sampling)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from iif.budget import Budget
from iif.checks import config_errors
from iif.metrics.base import Evaluator
from iif.rewards.decoded import DecodedReward


@dataclass
class Components:
    """A built run: the frozen base model, the reward, the method (which holds the sampler, guidance, buffer and
    conditions), the evaluator (which holds what it scores against), and the budget counters of base and reward."""

    base: object
    reward: object
    method: object
    evaluator: Evaluator
    budget: Budget
    device: torch.device = torch.device("cpu")

    def prepare(self) -> None:
        """Load or train what the components need before a run (cached pretraining of the base model and of the
        reward's classifier, the evaluator's reference), in that order: each may use the ones before."""
        self.base.prepare()
        self.reward.prepare()
        self.evaluator.prepare()


def build(cfg: DictConfig, device: torch.device = torch.device("cpu")) -> Components:
    """Instantiate every component; the networks are placed on ``device`` before the method (and its optimiser) is
    built. A constructor that rejects its arguments raises a one-line :class:`~iif.utils.ConfigError`."""
    with config_errors():
        # the problem's data distribution (the toy's GMM), for base models built from it; `prior: null`: none
        data = {} if cfg.prior is None else {"prior": instantiate(cfg.prior)}
        base = instantiate(cfg.base_model, **data).place(device)  # with its schedule (base_model.schedule)
        reward = instantiate(cfg.reward).place(device)  # a classifier reward pretrains on the run's device
        if base.latent:  # methods see latents, the reward sees pixels
            reward = DecodedReward(reward, base.decode)
        guidance = instantiate(cfg.guidance, base=base, reward=reward).to(device)
        sampler = instantiate(cfg.sampler)
        buffer = instantiate(cfg.buffer)
        conditions = instantiate(cfg.conditions)
        conditions.bind(base=base, sampler=sampler)
        method = instantiate(cfg.method, base=base, reward=reward, sampler=sampler, guidance=guidance, buffer=buffer,
                             conditions=conditions)
        evaluator = instantiate(cfg.evaluation, base=base, reward=reward, sampler=sampler)
    return Components(base, reward, method, evaluator, Budget(base, reward), device)
