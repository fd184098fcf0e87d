"""The interface of an energy ``E(x)``: the unnormalised density ``exp(-E(x))``, its normaliser, exact samples."""
from __future__ import annotations

import abc

import torch

Tensor = torch.Tensor


class Energy(abc.ABC):
    """An energy ``E: R^D -> R`` with ``Z = int exp(-E(x)) dx`` known (closed form or a quadrature whose error is
    far below Monte-Carlo resolution) and exact samples of ``exp(-E) / Z``.

    Subclasses implement :meth:`_energy`, :meth:`_grad` and :meth:`sample` in float64 and set the attributes.

    Attributes:
        dim: ``D``.
        log_z: ``log int exp(-E(x)) dx``.
        log_z_method: how ``log_z`` was obtained (e.g. ``"closed form"``).
        modes: ``[K, D]`` float64, a representative point of each mode (None where there is one mode).
        mode_weights: ``[K]`` float64, the mass of each mode's basin under ``exp(-E) / Z`` (for a mode-TV metric;
            None where there is one mode).
    """

    dim: int
    log_z: float
    log_z_method: str
    modes: Tensor | None = None
    mode_weights: Tensor | None = None

    def __call__(self, x: Tensor) -> Tensor:
        """``E(x)``: ``[B, D] -> [B]``, computed in float64, returned in ``x``'s dtype (differentiable)."""
        return self._energy(x.to(torch.float64)).to(x.dtype)

    def grad(self, x: Tensor) -> Tensor:
        """``grad_x E(x)`` in closed form: ``[B, D] -> [B, D]``, computed in float64, returned in ``x``'s dtype."""
        return self._grad(x.to(torch.float64)).to(x.dtype)

    @abc.abstractmethod
    def _energy(self, x: Tensor) -> Tensor:
        """``E(x)`` for float64 ``x [B, D]`` -> ``[B]`` float64."""

    @abc.abstractmethod
    def _grad(self, x: Tensor) -> Tensor:
        """``grad_x E(x)`` for float64 ``x [B, D]`` -> ``[B, D]`` float64."""

    @abc.abstractmethod
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` exact samples of ``exp(-E) / Z``: ``[n, D]`` float64 on the CPU (``generator``: a CPU one)."""

    def mode_of(self, x: Tensor) -> Tensor:
        """The mode (index into :attr:`modes`) each point belongs to: ``[B, D] -> [B]`` long."""
        raise NotImplementedError(f"{type(self).__name__} has a single mode: no mode assignment")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim}, log_z={self.log_z:.6f} [{self.log_z_method}])"
