"""Gaussian probability paths ``x_t = alpha(t) x_0 + sigma(t) eps`` (docs/methods.md §0.1–0.2, "Gaussian paths").

Every schedule the suite knows is one of these: the continuous VP-SDE, a discrete DDPM schedule held as
``alphas_cumprod`` (as diffusers' schedulers hold it), and rectified flow. A pretrained network fixes its path, so the
base model owns it (``base_model.schedule``); samplers discretise it and methods read its coefficients.

Times are floats in ``[0, 1]``: ``t = 0`` is clean data, ``t = 1`` the noisiest state. Coefficients are computed in
float64 (pass float64 times; callers cast the result to the data's dtype).
"""
from __future__ import annotations

import abc
from typing import ClassVar

import torch

Tensor = torch.Tensor

SPACINGS = ("leading", "trailing", "linspace")


class GaussianPath(abc.ABC):
    """``p_t(x_t | x_0) = N(alpha(t) x_0, sigma(t)^2 I)``.

    Attributes:
        variance_preserving: ``alpha^2 + sigma^2 = 1`` (the DDPM sampler needs it).
        point_start: ``alpha(1) = sigma(1) = 0``: the chain starts at the point 0 (the Brownian base,
            ``sampler=brownian``), not at ``N(0, I)``.
    """

    variance_preserving: ClassVar[bool] = False
    point_start: ClassVar[bool] = False

    @abc.abstractmethod
    def alpha(self, t: Tensor) -> Tensor:
        """Signal coefficient ``alpha(t)`` (``[B]`` -> ``[B]``)."""

    @abc.abstractmethod
    def sigma(self, t: Tensor) -> Tensor:
        """Noise coefficient ``sigma(t)``."""

    def alphabar(self, t: Tensor) -> Tensor:
        """``alpha(t)^2`` (DDPM's ``alphabar``)."""
        return self.alpha(t) ** 2

    @abc.abstractmethod
    def diffusion_sq(self, t: Tensor) -> Tensor:
        """``g(t)^2`` of the forward SDE with these marginals, ``d sigma^2/dt - 2 sigma^2 d log alpha / dt``: the weight
        of the path KL ``int g^2/2 ||h||^2 dt`` (docs/methods.md §1.3)."""

    def d_alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(alpha'(t), sigma'(t))``, needed to convert a flow velocity to a noise prediction."""
        raise NotImplementedError(f"{type(self).__name__} has no time derivatives (velocity prediction needs them)")

    @abc.abstractmethod
    def grid(self, n_steps: int, spacing: str = "leading") -> Tensor:
        """``[n_steps + 1]`` float64 times ``0 = t_0 < t_1 < ... < t_N`` of a sampler with ``n_steps`` steps."""

    def network_time(self, t: Tensor) -> Tensor:
        """The time argument the network was trained with (continuous ``t`` unless a discrete schedule)."""
        return t

    @staticmethod
    def _check_steps(n_steps: int, spacing: str) -> None:
        if n_steps < 1:
            raise ValueError(f"sampler.n_steps must be >= 1, got {n_steps}")
        if spacing not in SPACINGS:
            raise ValueError(f"sampler.spacing must be one of {', '.join(SPACINGS)}, got '{spacing}'")
