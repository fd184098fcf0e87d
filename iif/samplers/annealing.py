"""The reward-annealing path (B) of the thermodynamic methods (docs/tilting.md §5, "Path (B)"): a chain in data space
from the base to the tilt through the geometric path

    ``gamma_lambda(x) = p_base(x) exp(lambda r(x) / T)``,  ``lambda in [0, 1]``,  ``Z_0 = 1``, ``Z_1 = Z``,

with ``grad log gamma_lambda = grad log p_base + lambda grad r / T`` (``T`` the reward's temperature). It needs the
base's own density and score in closed form (``base.data_log_prob``, ``base.data_score``: the analytic bases) and its
exact samples (``base.prior``); in the sampling case (a Gaussian base) it is geometric annealing from ``N(0, s^2 I)``
to ``exp(-E)``. Unlike the diffusion chains of :mod:`iif.samplers`, no network of the base runs: each step costs one
gradient of the reward (the energy).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

Tensor = torch.Tensor
Drift = Callable[[Tensor, Tensor], Tensor]  # c(x [B, D], s [B]) -> [B, D]


def _log_normal(x: Tensor, mean: Tensor, var: float) -> Tensor:
    """``log N(x; mean, var I)`` ``[B]`` (float64 sums)."""
    d = x[0].numel()
    r = (x - mean).flatten(1).to(torch.float64)
    return -0.5 * (r * r).sum(1) / var - 0.5 * d * math.log(2 * math.pi * var)


class RewardAnnealing:
    """Controlled annealed Langevin dynamics on path (B), time ``t in [0, H]``, ``K`` steps of ``delta = H / K``,
    ``s_k = k / K`` (the drift's time input) and ``lambda_k = s_k^p``.

    For a drift ``c(x, s)`` (the learned transport; ``c = 0`` is annealed importance sampling with Langevin moves):

    1. ``x_0 ~ pi_0 = p_base``;
    2. forward kernel ``F_k(x'|x) = N(x + delta (grad log gamma_k(x) + c(x, s_k)), 2 delta I)``, ``k = 0..K-1``;
    3. backward kernel ``B_k(x|x') = N(x' + delta (grad log gamma_{k+1}(x') - c(x', s_{k+1})), 2 delta I)``;
    4. work ``A = log gamma_1(x_K) - log pi_0(x_0) + sum_k [log B_k(x_k|x_{k+1}) - log F_k(x_{k+1}|x_k)]``.

    ``A - log Z`` is the log Radon–Nikodym derivative of the backward path law (started at ``gamma_1 / Z``) against
    the forward one, for any ``c`` and any ``K``: ``E_F[e^A] = Z`` (Jarzynski) and ``E_B[e^{-A}] = 1/Z`` (Crooks), and
    ``A == log Z`` on every path when the two laws agree. In continuous time the exact transport satisfies
    ``div(pi_t c) = -d_t pi_t``, i.e. the residual

        ``R = (d lambda / dt) r / T + div c + c . grad log gamma_lambda - d_t log Z_lambda``

    vanishes (NETS' PINN residual on this path; ``d lambda / dt = p s^{p-1} / H``). Gaussian base ``N(mu, Sigma)``,
    linear reward ``b . x`` (``T = 1``, ``p = 1``, ``H = 1``): ``gamma_lambda ∝ N(mu + lambda Sigma b, Sigma)``,
    ``log Z_lambda = lambda b . mu + lambda^2 b . Sigma b / 2`` and the exact drift is ``c = Sigma b``.

    Args:
        n_steps: ``K``; horizon: ``H`` (the Langevin time; larger mixes more, at the same cost per step);
        power: ``p`` of ``lambda = s^p`` (> 1 spends more steps near the base).
    """

    def __init__(self, n_steps: int = 100, horizon: float = 1.0, power: float = 1.0):
        if n_steps < 1 or not horizon > 0 or not power > 0:
            raise ValueError(f"method.chain needs n_steps >= 1, horizon > 0 and power > 0, got {n_steps}, {horizon}, "
                             f"{power}")
        self.n_steps, self.horizon, self.power = int(n_steps), float(horizon), float(power)
        self.delta = self.horizon / self.n_steps

    @staticmethod
    def check(base) -> None:
        """Refuse a base without a closed-form density, score and sampler (one line, before any compute)."""
        if getattr(base, "data_log_prob", None) is None or not hasattr(base, "prior"):
            raise ValueError(f"the reward-annealing path needs the base's own density, score and samples in closed "
                             f"form (base_model=gmm_exact); {type(base).__name__} has none")

    def s(self, k: int) -> float:
        """``s_k = k / K``."""
        return k / self.n_steps

    def lam(self, s: Tensor | float) -> Tensor | float:
        """``lambda(s) = s^p``."""
        return s ** self.power

    def dlam_dt(self, s: Tensor) -> Tensor:
        """``d lambda / dt = p s^{p-1} / H``."""
        return self.power * s.clamp(min=1e-12) ** (self.power - 1) / self.horizon

    @staticmethod
    def log_gamma(base, reward, x: Tensor, lam: float | Tensor) -> Tensor:
        """``log p_base(x) + lambda r(x) / T`` ``[B]`` float64."""
        lam = lam if isinstance(lam, float) else lam.to(torch.float64)
        return base.data_log_prob(x) + lam * reward.log_tilt(x).to(torch.float64)

    @staticmethod
    def grad_log_gamma(base, reward, x: Tensor, lam: float | Tensor) -> Tensor:
        """``grad log p_base(x) + lambda grad r(x) / T`` ``[B, D]``; ``lam`` a float or ``[B]``."""
        lam = lam if isinstance(lam, float) else lam.to(x.dtype).view(-1, *[1] * (x.dim() - 1))
        return base.data_score(x) + lam * reward.grad_log_tilt(x)

    def _times(self, k: int, x: Tensor) -> Tensor:
        return torch.full((x.shape[0],), self.s(k), dtype=x.dtype, device=x.device)

    def fields(self, base, reward, drift: Drift | None, x: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """``(grad log gamma_k(x) + c(x, s_k), grad log gamma_k(x) - c(x, s_k))`` at state ``k``: the forward kernel
        ``F_k`` leaving it and the backward kernel ``B_{k-1}`` arriving at it use the same gradient and drift, so each
        state costs one reward gradient and one drift evaluation."""
        grad = self.grad_log_gamma(base, reward, x, float(self.lam(self.s(k))))
        if drift is None:
            return grad, grad
        c = drift(x, self._times(k, x))
        return grad + c, grad - c

    def _log_ratio(self, x: Tensor, x_next: Tensor, fwd: Tensor, bwd_next: Tensor) -> Tensor:
        """``log B_k(x | x_next) - log F_k(x_next | x)`` ``[B]`` from the fields of both states."""
        var = 2 * self.delta
        return _log_normal(x, x_next + self.delta * bwd_next, var) - _log_normal(x_next, x + self.delta * fwd, var)

    def endpoints(self, base, reward, x0: Tensor, xK: Tensor) -> Tensor:
        """``log gamma_1(x_K) - log pi_0(x_0)`` ``[B]``."""
        return self.log_gamma(base, reward, xK, 1.0) - base.data_log_prob(x0)

    @torch.no_grad()
    def forward(self, base, reward, drift: Drift | None, n: int, keep_states: bool = False):
        """``n`` forward paths: ``(x_K [n, D], A [n] float64, states [K+1, n, D] or None)``."""
        x = base.prior.to(base.device).sample(n).to(torch.float32)
        states = [x] if keep_states else None
        work = -base.data_log_prob(x)
        fwd, _ = self.fields(base, reward, drift, x, 0)
        for k in range(self.n_steps):
            x_next = x + self.delta * fwd + math.sqrt(2 * self.delta) * torch.randn_like(x)
            fwd_next, bwd_next = self.fields(base, reward, drift, x_next, k + 1)
            work += self._log_ratio(x, x_next, fwd, bwd_next)
            x, fwd = x_next, fwd_next
            if keep_states:
                states.append(x)
        work += self.log_gamma(base, reward, x, 1.0)
        return x, work, (torch.stack(states) if keep_states else None)

    @torch.no_grad()
    def backward(self, base, reward, drift: Drift | None, xK: Tensor) -> Tensor:
        """The works ``A [n]`` of backward paths from ``x_K`` (exact target samples: Crooks' reverse works)."""
        x = xK.to(torch.float32)
        work = self.log_gamma(base, reward, x, 1.0)
        _, bwd = self.fields(base, reward, drift, x, self.n_steps)
        for k in range(self.n_steps - 1, -1, -1):
            x_prev = x + self.delta * bwd + math.sqrt(2 * self.delta) * torch.randn_like(x)
            fwd_prev, bwd_prev = self.fields(base, reward, drift, x_prev, k)
            work += self._log_ratio(x_prev, x, fwd_prev, bwd)
            x, bwd = x_prev, bwd_prev
        return work - base.data_log_prob(x)

    def works(self, base, reward, drift: Drift, states: Tensor) -> Tensor:
        """``A [B]`` of given (detached) paths ``states [K+1, B, D]``, with the graph through the drift."""
        out = self.endpoints(base, reward, states[0], states[-1])
        fwd, _ = self.fields(base, reward, drift, states[0], 0)
        for k in range(self.n_steps):
            fwd_next, bwd_next = self.fields(base, reward, drift, states[k + 1], k + 1)
            out = out + self._log_ratio(states[k], states[k + 1], fwd, bwd_next)
            fwd = fwd_next
        return out

    def residual(self, base, reward, x: Tensor, s: Tensor, c: Tensor, div_c: Tensor, f_dot: Tensor) -> Tensor:
        """NETS' PINN residual ``R = (d lambda/dt) r/T + div c + c . grad log gamma_lambda - dF/dt`` ``[B]`` at states
        ``x [B, D]`` and times ``s [B]``, given the drift there ``c [B, D]``, its divergence ``div_c [B]`` and the
        free energy's rate ``f_dot [B]`` (zero at every ``(x, s)`` iff ``c`` transports ``pi_lambda`` exactly)."""
        lam = self.lam(s)
        grad = self.grad_log_gamma(base, reward, x, lam)
        return (self.dlam_dt(s) * reward.log_tilt(x).to(s.dtype) + div_c + (c * grad).flatten(1).sum(1) - f_dot)

    def __repr__(self) -> str:
        return f"RewardAnnealing(K={self.n_steps}, H={self.horizon}, p={self.power})"
