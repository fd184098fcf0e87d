"""``DoubleWellEnergy``: an asymmetric double well in ``x_1`` times a standard normal in the other coordinates."""
from __future__ import annotations

import math

import numpy as np
import torch

from iif.energies.base import Energy

Tensor = torch.Tensor


class DoubleWellEnergy(Energy):
    """``E(x) = a x_1^4 + b x_1^2 + c x_1 + 1/2 |x_{2:D}|^2`` (separable; ``c != 0`` makes the wells unequal).

    ``log Z = log int exp(-E_1) dx_1 + (D - 1)/2 log 2 pi``, the first term by composite Gauss-Legendre quadrature
    (:attr:`PANELS` panels of :attr:`NODES` nodes on each of ``[-L, 0]`` and ``[0, L]``). ``L`` is the smallest of
    ``L_0 1.05^k`` beyond which ``E_1`` is convex and increasing outwards with ``E_1(+-L) - min E_1 >=``
    :attr:`TAIL_GAP` (= 60): the neglected tails weigh ``< e^-60 / |E_1'(+-L)| < 1e-26`` of the mass at the minimum.

    The two modes are the half-lines ``x_1 < 0`` (mode 0) and ``x_1 >= 0`` (mode 1); ``modes`` holds the minimiser
    of ``E`` on each, ``mode_weights`` each half-line's mass (by the same quadrature).

    Exact samples: ``x_{2:D} ~ N(0, I)``; ``x_1`` by rejection from an envelope ``exp(-env(x_1)) >= exp(-E_1(x_1))``
    that is piecewise constant on :attr:`CELLS` cells of ``[-L, L]`` (``env`` = the exact minimum of ``E_1`` on the
    cell, from the roots of ``E_1'``) with exponential tails outside (``env`` = the tangent of ``E_1`` at ``+-L``,
    below ``E_1`` there by convexity); accept with probability ``exp(-(E_1 - env))``.

    Args:
        dim: ``D >= 1``.
        a: quartic coefficient, > 0 (else ``exp(-E)`` is not integrable).
        b: quadratic coefficient (< 0 for two wells: at ``x_1 ≈ +-sqrt(-b / 2a)``).
        c: linear coefficient (tilts the wells: ``c > 0`` deepens the left one).
    """

    PANELS = 64
    NODES = 16
    CELLS = 4096
    TAIL_GAP = 60.0

    def __init__(self, dim: int = 2, a: float = 1.0, b: float = -6.0, c: float = 1.0):
        if int(dim) != dim or dim < 1:
            raise ValueError(f"reward.energy.dim must be an integer >= 1, got {dim}")
        if not a > 0:
            raise ValueError(f"reward.energy.a must be > 0 (exp(-E) integrable), got {a}")
        self.dim, self.a, self.b, self.c = int(dim), float(a), float(b), float(c)
        crit = np.roots([4 * self.a, 0.0, 2 * self.b, self.c])  # E_1' = 4a x^3 + 2b x + c
        self._crit = np.sort(crit[np.abs(crit.imag) < 1e-9].real)
        self._e_min = float(min(self.e1(self._crit)))

        # L: E_1 convex beyond L (x^2 >= -b / 6a), increasing outwards (beyond every critical point), gap >= TAIL_GAP
        L = 1.05 * max(0.1, float(np.abs(self._crit).max()), math.sqrt(max(0.0, -self.b / (6 * self.a))))
        while min(self.e1(L), self.e1(-L)) - self._e_min < self.TAIL_GAP:
            L *= 1.05
        self.L = L

        # composite Gauss-Legendre on each half-line: int exp(-(E_1 - e_min)) over [-L, 0] and [0, L]
        nodes, weights = np.polynomial.legendre.leggauss(self.NODES)
        edges = np.linspace(0.0, L, self.PANELS + 1)
        half = 0.5 * np.diff(edges)[:, None]
        xs = ((edges[:-1, None] + edges[1:, None]) / 2 + half * nodes[None]).ravel()
        ws = (half * weights[None]).ravel()
        mass = np.array([np.sum(ws * np.exp(-(self.e1(-xs) - self._e_min))),
                         np.sum(ws * np.exp(-(self.e1(xs) - self._e_min)))])
        log_z1 = -self._e_min + math.log(mass.sum())
        self.log_z = log_z1 + 0.5 * (self.dim - 1) * math.log(2 * math.pi)
        self.log_z_method = (f"composite Gauss-Legendre in x_1, {self.PANELS} panels x {self.NODES} nodes on each of "
                             f"[-L, 0] and [0, L], L = {L:.4f} (tails < e^-{self.TAIL_GAP:g}); "
                             f"+ (D-1)/2 log 2pi in closed form")
        self.mode_weights = torch.as_tensor(mass / mass.sum(), dtype=torch.float64)
        self.modes = torch.zeros(2, self.dim, dtype=torch.float64, device="cpu")
        for k, candidates in enumerate((self._crit[self._crit < 0], self._crit[self._crit >= 0])):
            candidates = np.append(candidates, 0.0)  # the minimiser on a half-line: a critical point or 0
            self.modes[k, 0] = float(candidates[np.argmin(self.e1(candidates))])

        # rejection envelope for x_1: CELLS constant pieces on [-L, L], then the two exponential tails
        cell_edges = np.linspace(-L, L, self.CELLS + 1)
        env = np.minimum(self.e1(cell_edges[:-1]), self.e1(cell_edges[1:]))
        for r in self._crit:  # a critical point inside a cell may be its minimum (|r| < L)
            i = min(int((r + L) / (2 * L) * self.CELLS), self.CELLS - 1)
            env[i] = min(env[i], self.e1(r))
        slopes = np.array([self.e1_prime(-L), self.e1_prime(L)])  # < 0, > 0
        tail_env = np.array([self.e1(-L), self.e1(L)])
        log_mass = np.concatenate([math.log(2 * L / self.CELLS) - (env - self._e_min),
                                   -(tail_env - self._e_min) - np.log(np.abs(slopes))])
        self._cell_edges = torch.as_tensor(cell_edges)
        self._cell_env = torch.as_tensor(env)
        self._tail_slope, self._tail_env = torch.as_tensor(slopes), torch.as_tensor(tail_env)
        self._pieces = torch.as_tensor(np.exp(log_mass - log_mass.max()))  # multinomial probabilities (unnormalised)
        self._accept_rate = float(mass.sum() / np.exp(log_mass).sum())

    # ----------------------------------------------------------------- the double well in x_1
    def e1(self, x):
        """``E_1(x) = a x^4 + b x^2 + c x`` (numpy or torch, any shape)."""
        return self.a * x ** 4 + self.b * x ** 2 + self.c * x

    def e1_prime(self, x):
        """``E_1'(x) = 4a x^3 + 2b x + c``."""
        return 4 * self.a * x ** 3 + 2 * self.b * x + self.c

    # ----------------------------------------------------------------- Energy
    def _energy(self, x: Tensor) -> Tensor:
        return self.e1(x[:, 0]) + 0.5 * (x[:, 1:] ** 2).sum(-1)

    def _grad(self, x: Tensor) -> Tensor:
        """``grad E = (E_1'(x_1), x_{2:D})``."""
        return torch.cat([self.e1_prime(x[:, :1]), x[:, 1:]], dim=1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        x1 = torch.empty(0, dtype=torch.float64, device="cpu")
        while x1.numel() < n:
            m = int(1.1 * (n - x1.numel()) / self._accept_rate) + 16
            piece = torch.multinomial(self._pieces, m, replacement=True, generator=generator)
            u = torch.rand(m, dtype=torch.float64, device="cpu", generator=generator)
            expo = -torch.log1p(-torch.rand(m, dtype=torch.float64, device="cpu", generator=generator))  # Exp(1)
            in_cell = piece < self.CELLS
            cell = piece.clamp(max=self.CELLS - 1)
            right = piece == self.CELLS + 1
            slope = torch.where(right, self._tail_slope[1], self._tail_slope[0])
            start = torch.where(right, self.L, -self.L)
            x_tail = start + expo / slope.abs() * torch.where(right, 1.0, -1.0)
            x_cell = self._cell_edges[cell] + u * (2 * self.L / self.CELLS)
            x = torch.where(in_cell, x_cell, x_tail)
            env = torch.where(in_cell, self._cell_env[cell],
                              torch.where(right, self._tail_env[1], self._tail_env[0]) + slope * (x - start))
            accept = torch.rand(m, dtype=torch.float64, device="cpu", generator=generator) < torch.exp(-(self.e1(x) - env))
            x1 = torch.cat([x1, x[accept]])
        rest = torch.randn(n, self.dim - 1, dtype=torch.float64, device="cpu", generator=generator)
        return torch.cat([x1[:n, None], rest], dim=1)

    def mode_of(self, x: Tensor) -> Tensor:
        """``0`` where ``x_1 < 0``, ``1`` where ``x_1 >= 0``: ``[B, D] -> [B]`` long."""
        return (x[:, 0] >= 0).long()
