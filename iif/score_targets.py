"""Score-matching targets on tilted samples (docs/tilting.md §3): random regression targets ``Y`` for the tilted score
``s*_t(x_t) = grad log p*_t(x_t)``, one class per estimator.

Setting: ``x_0 ~ p_tilt`` (or an approximation of it), ``x_t = alpha(t) x_0 + sigma(t) eps`` the base path's bridge
(``t = 0`` data, ``t = 1`` noise). Each target is unbiased, ``E[Y | x_t] = s*_t(x_t)``; they differ in their variance
given ``x_t``, which is what makes a regression on them (and its gradient) finite or not (§5):

* :class:`Conditional` (CSM, denoising): ``Y = -(x_t - alpha x_0) / sigma^2 = -eps / sigma``; needs only samples.
  Its variance ``~ d / sigma^2`` diverges at the data end (``t -> 0``).
* :class:`TargetScore` (TSM, the target score identity): ``Y = grad log p_tilt(x_0) / alpha``; needs the tilted
  score at the data. Its variance ``~ 1 / alpha^2`` diverges at the noise end.
* :class:`Mixed` (the unified paper's mixed, "novel" target): ``Y = kappa Y_TSM + (1 - kappa) Y_CSM`` with
  ``kappa = alpha^2 / (alpha^2 + sigma^2)``, i.e. ``Y = (alpha (grad log p_tilt(x_0) + x_0) - x_t) / (alpha^2 +
  sigma^2)``: unbiased for any ``kappa`` in ``[0, 1]``, and this ``kappa`` vanishes at the noise end like
  ``alpha^2`` and tends to 1 at the data end like ``1 - sigma^2``, which cancels both divergences (a finite variance
  integral under path-KL weighting; zero variance on a variance-preserving path when ``p_tilt = N(0, I)``).

A method regresses its guidance ``h`` (score units: guided score ``s_base + h``) on ``Y - s_base(x_t)`` with a
time weight (:func:`regression_loss`).
"""
from __future__ import annotations

import abc
from typing import ClassVar

import torch

Tensor = torch.Tensor


class ScoreTarget(abc.ABC):
    """A random target ``Y [B, *shape]`` with ``E[Y | x_t] = grad log p*_t(x_t)`` for ``x_0 ~ p_tilt``.

    Attributes:
        needs_target_score: whether :meth:`__call__` reads ``grad log p_tilt(x_0)`` (its caller computes it only then).
        name: short name (logs, tables).
    """

    needs_target_score: ClassVar[bool] = True
    name: ClassVar[str]

    @abc.abstractmethod
    def __call__(self, x0: Tensor, xt: Tensor, alpha: Tensor, sigma: Tensor, target_score: Tensor | None) -> Tensor:
        """``Y``: ``x0, xt [B, *shape]``; ``alpha, sigma`` broadcastable to them (``[B, 1, ...]``);
        ``target_score = grad log p_tilt(x0) [B, *shape]`` (None if not :attr:`needs_target_score`)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Conditional(ScoreTarget):
    """CSM: ``Y = -(x_t - alpha x_0) / sigma^2``."""

    needs_target_score = False
    name = "csm"

    def __call__(self, x0, xt, alpha, sigma, target_score=None):
        return -(xt - alpha * x0) / sigma ** 2


class TargetScore(ScoreTarget):
    """TSM: ``Y = grad log p_tilt(x_0) / alpha``."""

    name = "tsm"

    def __call__(self, x0, xt, alpha, sigma, target_score):
        return target_score / alpha


class Mixed(ScoreTarget):
    """NSM: ``Y = (alpha (grad log p_tilt(x_0) + x_0) - x_t) / (alpha^2 + sigma^2)`` (the ``kappa = alpha^2 /
    (alpha^2 + sigma^2)`` mixture of TSM and CSM)."""

    name = "nsm"

    def __call__(self, x0, xt, alpha, sigma, target_score):
        return (alpha * (target_score + x0) - xt) / (alpha ** 2 + sigma ** 2)

    @staticmethod
    def kappa(alpha: Tensor, sigma: Tensor) -> Tensor:
        """The mixing weight ``alpha^2 / (alpha^2 + sigma^2)`` of the TSM target."""
        return alpha ** 2 / (alpha ** 2 + sigma ** 2)


def tilted_score(base, reward, x0: Tensor, cond: Tensor | None = None) -> Tensor:
    """``grad log p_tilt(x_0) = grad log p_base(x_0) + grad r(x_0) / lambda`` ``[B, *shape]``: the base's data score
    (:meth:`~iif.base_models.base.BaseModel.data_score`: exact for analytic bases) plus the reward's gradient."""
    return base.data_score(x0, cond) + reward.grad_log_tilt(x0, cond).to(x0.dtype)


def regression_error(base, guidance, target: ScoreTarget, x0: Tensor, t: Tensor, eps: Tensor,
                     cond: Tensor | None = None, target_score: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The per-sample squared error of the guidance against a score target, and ``h``:

    1. ``x_t = alpha(t) x_0 + sigma(t) eps``                       (the base path's bridge)
    2. ``s_base = -eps_base(x_t, t) / sigma(t)``                  (detached base score)
    3. ``Y = target(x_0, x_t, alpha, sigma, grad log p_tilt(x_0))`` (detached)
    4. ``err = || h(x_t, t) - (Y - s_base) ||^2``                  (``h`` in score units: guided score ``s_base + h``)

    Args:
        x0: ``[B, *shape]`` tilted samples (or their approximation: buffer, resampled model samples).
        t: ``[B]`` times in ``(0, 1]``; eps: ``[B, *shape]`` standard normal draws.
        target_score: ``grad log p_tilt(x0) [B, *shape]`` when the target needs it (:func:`tilted_score`).
    Returns:
        (``err [B]``, ``h [B, *shape]``); only ``h`` carries a graph (to the guidance's parameters).
    """
    shape = (-1,) + (1,) * (x0.dim() - 1)
    t64 = t.to(torch.float64)
    dtype = torch.promote_types(x0.dtype, torch.float32)  # targets ~ 1/sigma: at least float32 for half samples
    a = base.schedule.alpha(t64).to(dtype).view(shape)
    s = base.schedule.sigma(t64).to(dtype).view(shape)
    xt = a * x0 + s * eps
    with torch.no_grad():
        e_base = base.eps(xt, t, cond)
        x0_hat = base.x0_hat(xt, t, e_base)
        y = target(x0, xt, a, s, target_score) + e_base / s  # Y - s_base
    h = guidance(xt, t, x0_hat, cond)
    return ((h - y) ** 2).flatten(1).sum(-1), h
