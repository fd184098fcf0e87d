"""``log_z``: estimators of the log-normaliser ``log Z`` of the tilted target ``p_tilt = p_base exp(r) / Z``,
``Z = E_{p_base}[exp(r)]``, from per-path log-weights ("works"), and the diagnostics built on them.

A sampler with control ``u`` defines a path measure ``P^u``; the target path measure ``P*`` (tilted endpoint, then the
base's own bridge) has ``dP* / dP^base = exp(r(X_K)) / Z``. The work of a path is
``W = r(X_K) - log dP^u / dP^base = log dP* / dP^u + log Z``, so that

* forward works ``W_i`` (paths of ``P^u``): ``E_{P^u}[exp(W)] = Z`` (Jarzynski) and
  ``E_{P^u}[W] = log Z - KL(P^u || P*)``;
* reverse works ``W'_j`` (paths of ``P*``): ``E_{P*}[exp(-W)] = 1 / Z`` (Crooks) and
  ``E_{P*}[W] = log Z + KL(P* || P^u)``;

hence the sandwich ``E_{P^u}[W] <= log Z <= E_{P*}[W]``. With finite samples the Jarzynski estimate is biased low,
the Crooks estimate biased high, and Bennett's acceptance ratio (BAR), which uses both, has the least variance.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

Tensor = torch.Tensor


def _works(w: Tensor, name: str) -> Tensor:
    """``w`` as a float64 CPU ``[n]`` tensor, ``n >= 2``, finite; else a ValueError naming ``name``."""
    w = (w if isinstance(w, Tensor) else torch.as_tensor(w, device="cpu")).detach().double().cpu()
    if w.dim() != 1 or w.shape[0] < 2:
        raise ValueError(f"{name} must have shape [n] with n >= 2, got {tuple(w.shape)}")
    bad = ~torch.isfinite(w)
    if bad.any():
        raise ValueError(f"{name} has {int(bad.sum())} non-finite values (NaN/inf) out of {w.shape[0]}, "
                         f"first at index {int(bad.nonzero()[0])}")
    return w


def _softplus(x: Tensor) -> Tensor:
    """``log(1 + exp(x))``, exact in float64 for all ``x`` (``torch.nn.functional.softplus`` linearises past 20)."""
    return torch.logaddexp(torch.zeros_like(x), x)


def jarzynski(w_forward: Tensor) -> float:
    """Jarzynski's estimate ``log Z_F = logsumexp(W) - log n`` from forward works ``w_forward`` ``[n]`` (paths of the
    sampler ``P^u``; ``E_{P^u}[exp(W)] = Z``). Biased low for finite ``n`` (Jensen)."""
    w = _works(w_forward, "w_forward")
    return torch.logsumexp(w, 0).item() - math.log(w.shape[0])


def crooks(w_reverse: Tensor) -> float:
    """The reverse (Crooks) estimate ``log Z_R = -(logsumexp(-W') - log m)`` from reverse works ``w_reverse`` ``[m]``
    (paths of the target path measure ``P*``; ``E_{P*}[exp(-W)] = 1 / Z``). Biased high for finite ``m``."""
    w = _works(w_reverse, "w_reverse")
    return -(torch.logsumexp(-w, 0).item() - math.log(w.shape[0]))


def _bar_h(f: float, wf: Tensor, wr: Tensor) -> tuple[float, float]:
    """``h(f) = log mean_i sigmoid(W_i - f) - log mean_j sigmoid(f - W'_j)`` and ``h'(f) = -(a + b)`` with
    ``a = sum_i sigmoid(W_i - f) sigmoid(f - W_i) / sum_i sigmoid(W_i - f)`` and
    ``b = sum_j sigmoid(f - W'_j) sigmoid(W'_j - f) / sum_j sigmoid(f - W'_j)``, both in ``(0, 1)``."""
    lf = -_softplus(f - wf)  # log sigmoid(W - f)  [n]
    lr = -_softplus(wr - f)  # log sigmoid(f - W') [m]
    lse_f, lse_r = torch.logsumexp(lf, 0), torch.logsumexp(lr, 0)
    h = (lse_f - math.log(wf.shape[0])) - (lse_r - math.log(wr.shape[0]))
    a = (torch.exp(lf - lse_f) * torch.sigmoid(f - wf)).sum()
    b = (torch.exp(lr - lse_r) * torch.sigmoid(wr - f)).sum()
    return h.item(), -(a + b).item()


def bar(w_forward: Tensor, w_reverse: Tensor, tol: float = 1e-10, max_iter: int = 1000) -> float:
    """Bennett's acceptance ratio: the ``f = log Z_BAR`` solving

        ``(1/n) sum_i sigmoid(W_i - f) = (1/m) sum_j sigmoid(f - W'_j)``,

    with forward works ``w_forward`` ``[n]`` (paths of ``P^u``) and reverse works ``w_reverse`` ``[m]`` (paths of
    ``P*``). Solved as the root of the strictly decreasing ``h(f) = log LHS(f) - log RHS(f)``, ``h' = -(a + b)``,
    ``a, b in (0, 1)`` (see ``_bar_h``), by Newton's method safeguarded by bisection: start at
    ``f = (log Z_F + log Z_R) / 2``, bracket the root by doubling steps, then take the Newton step when it stays
    inside the bracket and the bisection step otherwise, until ``|df| < tol * max(1, |f|)``.

    (The self-consistent iteration ``f <- f + h(f)`` has the same fixed point, but its slope ``1 - a - b`` tends to
    ``-1`` when the work distributions barely overlap (``a, b -> 1``): it then oscillates about the root and may
    need millions of steps. The Newton step ``f <- f + h / (a + b)`` is exact in that limit.)

    Raises:
        RuntimeError: no convergence within ``max_iter`` Newton/bisection steps.
    """
    wf, wr = _works(w_forward, "w_forward"), _works(w_reverse, "w_reverse")
    if not tol > 0:
        raise ValueError(f"bar: tol must be > 0, got {tol}")
    if max_iter < 1:
        raise ValueError(f"bar: max_iter must be >= 1, got {max_iter}")
    f = 0.5 * (jarzynski(wf) + crooks(wr))
    h, dh = _bar_h(f, wf, wr)
    if h == 0.0:
        return f
    # Bracket [lo, hi] with h(lo) > 0 > h(hi); h -> +inf as f -> -inf and -inf as f -> +inf, at slope <= 1 in size.
    step = max(1.0, abs(h))
    lo = hi = f
    for _ in range(1100):  # the step overflows float64 past 2^1024: the sign change always comes first
        if h > 0:
            lo, hi = f, f + step
            if _bar_h(hi, wf, wr)[0] <= 0:
                break
        else:
            lo, hi = f - step, f
            if _bar_h(lo, wf, wr)[0] >= 0:
                break
        step *= 2.0
    for _ in range(max_iter):
        f_new = f - h / dh if dh < 0 else math.nan
        if not lo < f_new < hi:
            f_new = 0.5 * (lo + hi)
        h, dh = _bar_h(f_new, wf, wr)
        if h == 0.0:
            return f_new
        if h > 0:
            lo = f_new
        else:
            hi = f_new
        scale = tol * max(1.0, abs(f_new))
        if abs(f_new - f) < scale or hi - lo < scale:
            return f_new
        f = f_new
    raise RuntimeError(f"bar: no convergence to tol={tol} within max_iter={max_iter} steps "
                       f"(last f={f}, bracket [{lo}, {hi}])")


def ess(log_w: Tensor) -> float:
    """Effective sample size ``(sum exp(w))^2 / sum exp(2 w) = exp(2 logsumexp(w) - logsumexp(2 w))`` of
    log-weights ``log_w`` ``[n]`` (in log space: no overflow; invariant to a shift of ``log_w``)."""
    w = _works(log_w, "log_w")
    return math.exp(2 * torch.logsumexp(w, 0).item() - torch.logsumexp(2 * w, 0).item())


def ess_frac(log_w: Tensor) -> float:
    """``ess(log_w) / n`` in ``[1/n, 1]``, for log-weights ``log_w`` ``[n]``."""
    w = _works(log_w, "log_w")
    return ess(w) / w.shape[0]


@dataclass
class LogZReport:
    """The estimates and diagnostics of :func:`log_z_report` (None where they need reverse works or ``log Z``).

    Attributes:
        log_z_jarzynski, log_z_crooks, log_z_bar: the estimates of ``log Z`` (:func:`jarzynski`, :func:`crooks`,
            :func:`bar`).
        work_forward_mean: ``mean W_F``, an estimate of ``log Z - KL(P^u || P*)``.
        work_reverse_mean: ``mean W_R``, an estimate of ``log Z + KL(P* || P^u)``.
        sandwich_ok: ``mean W_F <= log Z_hat <= mean W_R``.
        kl_gap: ``log Z_hat - mean W_F``, an estimate of ``KL(P^u || P*)`` (``log Z_hat`` = BAR where available,
            else Jarzynski).
        kl_gap_reverse: ``mean W_R - log Z_hat``, an estimate of ``KL(P* || P^u)``.
        work_ess_frac: :func:`ess_frac` of the forward works (the importance weights of the sampler's paths to ``P*``).
        log_z_exact: the true ``log Z`` when given.
        log_z_error_jarzynski, log_z_error_crooks, log_z_error_bar: signed errors ``estimate - log_z_exact``.
    """

    log_z_jarzynski: float
    work_forward_mean: float
    kl_gap: float
    work_ess_frac: float
    log_z_crooks: float | None = None
    log_z_bar: float | None = None
    work_reverse_mean: float | None = None
    sandwich_ok: bool | None = None
    kl_gap_reverse: float | None = None
    log_z_exact: float | None = None
    log_z_error_jarzynski: float | None = None
    log_z_error_crooks: float | None = None
    log_z_error_bar: float | None = None

    def as_metrics(self, prefix: str = "") -> dict[str, float]:
        """The fields as a flat ``{prefix + name: float}`` dict, Nones skipped, ``sandwich_ok`` as 1.0 / 0.0."""
        return {prefix + fl.name: float(v) for fl in fields(self) if (v := getattr(self, fl.name)) is not None}


def log_z_report(w_forward: Tensor, w_reverse: Tensor | None = None,
                 log_z_exact: float | None = None) -> LogZReport:
    """The ``log Z`` estimates and path-space diagnostics of forward works ``w_forward`` ``[n]`` and, optionally,
    reverse works ``w_reverse`` ``[m]`` (see :class:`LogZReport`): ``log Z_hat`` is BAR with reverse works, else
    Jarzynski; ``kl_gap = log Z_hat - mean W_F``; ``sandwich_ok = mean W_F <= log Z_hat <= mean W_R``."""
    wf = _works(w_forward, "w_forward")
    rep = LogZReport(log_z_jarzynski=jarzynski(wf), work_forward_mean=wf.mean().item(), kl_gap=math.nan,
                     work_ess_frac=ess_frac(wf))
    log_z = rep.log_z_jarzynski
    if w_reverse is not None:
        wr = _works(w_reverse, "w_reverse")
        rep.log_z_crooks = crooks(wr)
        rep.log_z_bar = log_z = bar(wf, wr)
        rep.work_reverse_mean = wr.mean().item()
        rep.sandwich_ok = rep.work_forward_mean <= log_z <= rep.work_reverse_mean
        rep.kl_gap_reverse = rep.work_reverse_mean - log_z
    rep.kl_gap = log_z - rep.work_forward_mean
    if log_z_exact is not None:
        log_z_exact = float(log_z_exact)
        if not math.isfinite(log_z_exact):
            raise ValueError(f"log_z_report: log_z_exact must be finite, got {log_z_exact}")
        rep.log_z_exact = log_z_exact
        rep.log_z_error_jarzynski = rep.log_z_jarzynski - log_z_exact
        if w_reverse is not None:
            rep.log_z_error_crooks = rep.log_z_crooks - log_z_exact
            rep.log_z_error_bar = rep.log_z_bar - log_z_exact
    return rep


def own_log_z_metrics(method, n: int, log_z_exact: float) -> dict[str, float]:
    """The method's own ``log Z`` estimates (``Method.log_z_estimates(n)``: ``log_z_<name>`` and diagnostics) with
    each estimate's signed error ``log_z_error_<name> = estimate - log_z_exact`` beside it; ``{}`` for ``n = 0`` or a
    method without its own estimator."""
    if n == 0:
        return {}
    own = method.log_z_estimates(n)
    errors = {f"log_z_error_{k[len('log_z_'):]}": v - float(log_z_exact)
              for k, v in own.items() if k.startswith("log_z_")}
    return {**own, **errors}
