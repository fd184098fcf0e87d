"""Sampler outputs."""
from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor


@dataclass
class Trajectory:
    """What one run of a (guided) sampler returns.

    Attributes:
        x0: ``[B, *shape]`` final samples.
        log_rnd: ``[B]`` float64, ``log dP^0/dP^h`` of each path (METHODS.md §2.3), accumulated during sampling;
            0 for the unguided sampler.
        control_cost: ``[B]`` float64, ``sum_t ||Delta_t||^2 / (2 sigma_t^2)``: the path KL integrand of the
            stochastic-control loss (§1.2); ``E[control_cost] = KL(P^h || P^0)``. None where the samples are not
            the endpoints of one diffusion path (e.g. best-of-K).
        states: ``[N+1, B, *shape]`` ``x_N, ..., x_0`` if asked for, else None.
        noises: ``[N, B, *shape]`` the ``z_t`` used at each step if asked for, else None.
        base_means: ``[N, B, *shape]`` the base kernel means ``mu^0_t(x_t)`` of each step if asked for, else None.
        x0_hats: ``[N, B, *shape]`` the base's Tweedie estimates at ``x_N, ..., x_1`` if asked for, else None.
        nfe: network evaluations of the base model per sample.
        stl_log_ratio: ``[B]`` float64 ``log dP^h/dP^0`` with the sticking-the-landing graph
            (``DDPMSampler.rsample(stl=True)``), else None.
    """

    x0: Tensor
    log_rnd: Tensor
    control_cost: Tensor | None
    states: Tensor | None = None
    noises: Tensor | None = None
    base_means: Tensor | None = None
    x0_hats: Tensor | None = None
    nfe: int = 0
    stl_log_ratio: Tensor | None = None
