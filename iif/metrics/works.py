"""Path works of a method's samples and of exact target paths: the inputs of the log Z estimators
(``iif.metrics.log_z``; docs/tilting.md §4.4).

With ``gamma(x) = p_data(x) exp(r(x)/lambda)`` the unnormalised tilt (``Z = int gamma``), the method's path law
``P^h`` and the base path's noising chain ``q(x_{1:N} | x_0)`` as the backward process, the work of a path is

    ``W = log gamma(x_0) + log q(x_{1:N} | x_0) - log P^h(x_{0:N})``.

Forward (``x_{0:N} ~ P^h``): ``E[e^W] = Z`` (Jarzynski). Reverse (``x_0 ~ p_tilt``, ``x_{1:N} ~ q(. | x_0)``):
``E[e^{-W}] = 1/Z`` (Crooks). Both are exact in discrete time, for any guidance and any number of steps; at a
perfect sampler ``W = log Z`` on every path. The forward work needs no extra evaluation: the sampler accumulates
``log q - log P^h`` as ``log_rnd + log_backward``.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from iif.samplers.base import Trajectory

Tensor = torch.Tensor


def forward_works(traj: Trajectory, log_gamma: Callable[[Tensor], Tensor]) -> Tensor | None:
    """``W_F = log gamma(x_0) + log_rnd + log_backward`` ``[B]`` float64 of a method's own samples; None where
    the sampler has no path density (a deterministic kernel) or the samples are not one path's endpoints."""
    if traj.log_backward is None or traj.control_cost is None:
        return None
    return log_gamma(traj.x0).to(torch.float64).cpu() + traj.log_rnd.cpu() + traj.log_backward.cpu()


@torch.no_grad()
def reverse_works(method, x0: Tensor, log_gamma: Callable[[Tensor], Tensor]) -> Tensor | None:
    """``W_R = log gamma(x_0) + log B(x_{1:N} | x_0) - log P^h(x_{0:N})`` ``[B]`` float64 for exact target samples
    ``x0 [B, *shape]``, their paths drawn from the method's backward process (the noising chain for the diffusion
    methods: ``Method.reverse_log_weights``); None where the method has no path density."""
    x0 = x0.to(method.base.device, torch.float32)
    log_w = method.reverse_log_weights(x0)
    return None if log_w is None else log_gamma(x0).to(torch.float64).cpu() + log_w.cpu()
