"""Importance weights and the relaxed rejection step with an adaptive constant (docs/methods.md §3).

``log w_i = r(x_0^i)/lambda + log RND_i``; each sample is kept with probability ``alpha_i = min(1, w_i / c)``;
``c`` is chosen so that the expected acceptance rate ``G(log c) = mean_i exp(min(0, log w_i - log c))``
equals the requested rate ``rho``.
"""
from __future__ import annotations

import math

import torch

Tensor = torch.Tensor


def _check_rate(rho: float) -> None:
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"acceptance rate must lie in (0, 1], got {rho}")


def expected_acceptance(log_w: Tensor, log_c: float | Tensor) -> Tensor:
    """``G(log c) = (1/N) sum_i exp(min(0, log w_i - log c))`` (float64 scalar)."""
    return torch.exp(torch.clamp(log_w.to(torch.float64) - log_c, max=0.0)).mean()


def solve_log_c(log_w: Tensor, rho: float) -> float:
    """Exact ``log c`` with ``G(log c) = rho`` (sort-based, no iteration; docs/methods.md §3.3).

    Sort ``l_(1) >= ... >= l_(N)``. If ``k`` samples have ``alpha = 1`` then
    ``G = (k + exp(-log c) sum_{j>k} exp(l_(j))) / N``, so ``log c_k = logsumexp_{j>k} l_(j) - log(N rho - k)``;
    the answer is the ``c_k`` that is consistent, i.e. ``l_(k+1) <= log c_k <= l_(k)`` (``l_(0) = +inf``).

    Args:
        log_w: ``[N]`` finite log-weights.
        rho: target expected acceptance rate in ``(0, 1]``. For ``rho = 1`` the largest valid value,
            ``min_i log w_i``, is returned.
    Returns:
        ``log c`` as a Python float.
    """
    _check_rate(rho)
    lw = log_w.detach().to(torch.float64).flatten()
    if lw.numel() == 0 or not torch.isfinite(lw).all():
        raise ValueError("log-weights must be a non-empty vector of finite numbers")
    n = lw.numel()
    if rho == 1.0:
        return float(lw.min())
    srt, _ = torch.sort(lw, descending=True)
    # tail[k] = logsumexp(srt[k:]) for k = 0..N-1
    tail = torch.logcumsumexp(srt.flip(0), dim=0).flip(0)
    k = torch.arange(n, dtype=torch.float64, device=srt.device)
    room = n * rho - k
    valid = room > 0
    log_c = torch.full_like(srt, math.inf)
    log_c[valid] = tail[valid] - torch.log(room[valid])
    upper = torch.cat([srt.new_full((1,), math.inf), srt[:-1]])  # l_(k), with l_(0)=+inf
    tol = 1e-12 * (1 + srt.abs())
    ok = valid & (log_c <= upper + tol) & (log_c >= srt - tol)
    idx = torch.nonzero(ok)
    if idx.numel() == 0:  # cannot happen for finite inputs; guard against silent nonsense
        raise RuntimeError("no consistent log c found; please report this with the log-weights")
    return float(log_c[idx[0, 0]])


def solve_log_c_bisection(log_w: Tensor, rho: float, tol: float = 1e-10, max_iter: int = 10_000) -> float:
    """Reference solver: bracket, then bisect ``G(l) = rho`` (Hertrich & Gruhlke, docs/methods.md §3.3 steps 1–4)."""
    _check_rate(rho)
    lw = log_w.detach().to(torch.float64)
    lo = hi = float(lw.mean())
    step = 1.0
    for _ in range(max_iter):  # G is non-increasing in l: move hi up until G(hi) <= rho
        if expected_acceptance(lw, hi) <= rho:
            break
        hi += step
        step *= 2
    step = 1.0
    for _ in range(max_iter):  # ... and lo down until G(lo) >= rho
        if expected_acceptance(lw, lo) >= rho:
            break
        lo -= step
        step *= 2
    for _ in range(max_iter):
        mid = 0.5 * (lo + hi)
        if hi - lo < tol:
            break
        if expected_acceptance(lw, mid) > rho:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def solve_log_c_per_group(log_w: Tensor, rho: float, group_size: int) -> Tensor:
    """One ``log c`` per group of ``group_size`` consecutive samples, each solving its group's ``G(log c) = rho``
    (:func:`solve_log_c`): ``log_w [N]`` -> ``[N]``, each sample's constant.

    For samples drawn under a shared condition ``y`` (a measurement, a prompt), ``w = exp(r(x | y)/lambda) RND``
    carries the condition's normaliser ``Z(y)``, which one constant for the whole batch would compare across
    conditions: the accepted set would crowd onto the conditions with the largest ``Z(y)``. Per group the
    normaliser cancels, every condition keeps about ``rho`` of its samples, and the accepted ``x | y`` still follows
    ``p(x | y)`` wherever ``w < c(y)`` (docs/methods.md §3.5)."""
    lw = log_w.detach().to(torch.float64).flatten()
    if group_size < 1 or lw.numel() % group_size:
        raise ValueError(f"{lw.numel()} log-weights do not split into groups of {group_size}")
    per_group = [solve_log_c(g, rho) for g in lw.view(-1, group_size)]
    return torch.tensor(per_group, dtype=torch.float64, device=lw.device).repeat_interleave(group_size)


def relaxed_rejection(log_w: Tensor, log_c: float | Tensor) -> Tensor:
    """Keep sample ``i`` iff ``log u_i <= min(0, log w_i - log c_i)``, ``u_i ~ U(0, 1)``: ``[N]`` bool (``log c`` one
    number, or ``[N]``: each sample's)."""
    lw = log_w.to(torch.float64)
    log_u = torch.log(torch.rand(lw.shape, dtype=torch.float64, device=lw.device))
    return log_u <= torch.clamp(lw - log_c, max=0.0)
