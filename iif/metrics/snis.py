"""``snis``: a Monte-Carlo reference of the tilted target ``p_tilt(x) = p(x) exp(r(x) / lambda) / Z`` from samples of
the base model ``p`` by self-normalised importance sampling (SNIS), for image tasks whose target has no closed form.

With ``x_i ~ p`` and weights ``w_i = exp(r_i / lambda)`` (``log_w = r / lambda``, e.g. ``reward.log_tilt(x)``), the
tilted expectation of ``f`` is estimated by ``sum_i w_i f(x_i) / sum_i w_i``. For the classifier reward with
``lambda = 1``, ``r = log p(c | x)``, the target ``p(x) p(c | x) / Z`` is the base model's class posterior and
``Z = p(c)`` its class marginal. The estimate is only as good as its effective sample size: a reference with
``ess`` of a few dozen is not a reference, whatever ``N`` is.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

Tensor = torch.Tensor


@dataclass
class SNISReference:
    """The SNIS estimates of :func:`snis_reference` (float64 tensors on CPU).

    Attributes:
        n: ``N``, the base samples.
        ess: ``(sum w)^2 / sum w^2``; ess_frac: ``ess / N``.
        log_z: ``log (1/N sum w) = logsumexp(log_w) - log N``, the estimate of ``log E_p[exp(r / lambda)]``.
        reward_mean: ``sum w r / sum w``, the estimate of ``E_tilt[r]``.
        reward_mean_se: its delta-method standard error ``sqrt(sum w^2 (r - reward_mean)^2) / sum w``.
        weights: the normalised weights ``w / sum w`` ``[N]``.
        class_fractions: ``sum_i w_i 1[label_i = c] / sum w`` ``[n_classes]``, or None without labels.
        resampled: ``[n_resample]`` indices drawn with replacement with probabilities ``w / sum w`` (multinomial
            resampling: ``x[resampled]`` are approximate samples of the target).
    """

    n: int
    ess: float
    ess_frac: float
    log_z: float
    reward_mean: float
    reward_mean_se: float
    weights: Tensor
    class_fractions: Tensor | None
    resampled: Tensor


def snis_reference(log_w: Tensor, rewards: Tensor, labels: Tensor | None = None, n_classes: int | None = None,
                   n_resample: int = 0, generator: torch.Generator | None = None) -> SNISReference:
    """SNIS estimates of the tilted target from base samples ``x_i ~ p``, ``i = 1..N``:

    * ``w_i = exp(log_w_i)``, ``log_w = r / lambda`` (any additive constant cancels everywhere but in ``log_z``);
    * ``ess = (sum w)^2 / sum w^2 = exp(2 logsumexp(log_w) - logsumexp(2 log_w))`` (in log space: no overflow);
    * ``log_z = logsumexp(log_w) - log N``;
    * ``reward_mean = sum w r / sum w``, ``reward_mean_se = sqrt(sum w^2 (r - reward_mean)^2) / sum w``;
    * ``class_fractions[c] = sum_i w_i 1[label_i = c] / sum w``;
    * ``resampled ~ Multinomial(w / sum w)``, ``n_resample`` indices with replacement (``torch.multinomial``, which
      takes at most ``2^24`` categories).

    Args:
        log_w: ``[N]`` log-weights, finite.
        rewards: ``[N]`` rewards ``r_i``, finite.
        labels: ``[N]`` integer class labels (e.g. the classifier's argmax), or None.
        n_classes: the length of ``class_fractions`` (default ``max(labels) + 1``).
        n_resample: resampled indices to draw.
        generator: the random generator of the resampling (a CPU generator).
    """
    log_w = torch.as_tensor(log_w).detach().double().cpu()
    rewards = torch.as_tensor(rewards).detach().double().cpu()
    if log_w.dim() != 1 or log_w.shape[0] < 2:
        raise ValueError(f"snis_reference needs log_w of shape [N] with N >= 2, got {tuple(log_w.shape)}")
    n = log_w.shape[0]
    if rewards.shape != (n,):
        raise ValueError(f"snis_reference: rewards has shape {tuple(rewards.shape)}, log_w [{n}]")
    for name, v in (("log_w", log_w), ("rewards", rewards)):
        bad = ~torch.isfinite(v)
        if bad.any():
            raise ValueError(f"snis_reference: {name} has {int(bad.sum())} non-finite values (NaN/inf) out of {n}, "
                             f"first at index {int(bad.nonzero()[0])}")
    if n_resample < 0:
        raise ValueError(f"snis_reference: n_resample must be >= 0, got {n_resample}")

    lse = torch.logsumexp(log_w, 0)
    w = torch.exp(log_w - lse)  # normalised weights, sum 1
    ess = math.exp(2 * lse.item() - torch.logsumexp(2 * log_w, 0).item())
    reward_mean = (w * rewards).sum()
    reward_mean_se = ((w ** 2) * (rewards - reward_mean) ** 2).sum().sqrt()

    class_fractions = None
    if labels is not None:
        labels = torch.as_tensor(labels).detach().cpu()
        if labels.shape != (n,) or labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"snis_reference: labels must be integer [{n}], got {labels.dtype} "
                             f"{tuple(labels.shape)}")
        labels = labels.long()
        k = int(labels.max()) + 1 if n_classes is None else int(n_classes)
        if int(labels.min()) < 0 or int(labels.max()) >= k:
            raise ValueError(f"snis_reference: labels must lie in 0..{k - 1} (n_classes={k}), got "
                             f"{int(labels.min())}..{int(labels.max())}")
        class_fractions = torch.zeros(k, dtype=torch.float64).index_add_(0, labels, w)

    resampled = (torch.multinomial(w, n_resample, replacement=True, generator=generator) if n_resample > 0
                 else torch.zeros(0, dtype=torch.long))
    return SNISReference(n=n, ess=ess, ess_frac=ess / n, log_z=lse.item() - math.log(n),
                         reward_mean=reward_mean.item(), reward_mean_se=reward_mean_se.item(), weights=w,
                         class_fractions=class_fractions, resampled=resampled)
