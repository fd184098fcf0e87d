"""The frozen pretrained model that every method fine-tunes or guides (docs/methods.md §0.2, "Gaussian paths")."""
from __future__ import annotations

import abc
import contextlib
import math
from typing import ClassVar

import torch
from torch import nn

from iif.schedules.base import GaussianPath

Tensor = torch.Tensor

PREDICTION_TYPES = ("eps", "x0", "v", "velocity")
# a network's weights and arithmetic (``base_model.dtype``; samples and what methods compute stay float32)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class BaseModel(nn.Module, abc.ABC):
    """A frozen network on a Gaussian path ``x_t = alpha(t) x_0 + sigma(t) eps``, of any sample shape, with an
    optional condition.

    Subclasses implement :meth:`predict` in their ``prediction_type``; callers use :meth:`eps`, which converts the
    prediction to a noise prediction in one place (:meth:`to_eps`) and counts network evaluations (``nfe``, per
    sample and call: the method-independent budget; ``evals_per_call`` is 2 for classifier-free guidance). The score
    and Tweedie estimate follow from the path: ``s(x, t) = -eps(x, t) / sigma(t)``,
    ``x0_hat = (x_t - sigma(t) eps) / alpha(t)``.

    Args:
        schedule: the Gaussian path the network was trained on.
        sample_shape: shape of one sample (what methods see: latents for a latent model), e.g. ``(2,)``, ``(1, 8, 8)``.
        prediction_type: what :meth:`predict` returns: ``eps`` (noise), ``x0`` (clean sample), ``v``
            (``alpha eps - sigma x0``) or ``velocity`` (the flow ``d x_t / dt = alpha' x0 + sigma' eps``).

    Attributes:
        provides: capabilities a method may require; ``"differentiable_base"``: :meth:`eps` is differentiable in ``x``
            by autograd (methods may backpropagate through the chain or take vector-Jacobian products of it);
            ``"null_condition"``: :meth:`null_condition` exists (an empty prompt: CFG's unconditional branch).
        evals_per_call: network evaluations per sample of one :meth:`eps` call.
        latent: whether samples are latents that :meth:`decode` maps to pixels (the run's reward is then applied to
            decoded samples: ``iif.rewards.decoded``).
    """

    provides: ClassVar[frozenset[str]] = frozenset({"differentiable_base"})
    data_log_prob = None  # analytic bases: a method ``data_log_prob(x [B, *shape]) -> [B]``, ``log p_data(x)``
    evals_per_call: ClassVar[int] = 1
    latent: ClassVar[bool] = False

    def __init__(self, schedule: GaussianPath, sample_shape: tuple[int, ...], prediction_type: str = "eps"):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"base_model.prediction_type must be one of {', '.join(PREDICTION_TYPES)}, "
                             f"got '{prediction_type}'")
        self.schedule = schedule
        self.sample_shape = tuple(sample_shape)
        self.prediction_type = prediction_type
        self.nfe = 0
        self.device = torch.device("cpu")

    def place(self, device: torch.device) -> "BaseModel":
        """Move the network to ``device``; the sampler draws the prior there (``device`` config key)."""
        self.to(device)
        self.device = torch.device(device)
        return self

    def eps(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """Noise prediction ``eps_theta(x_t, t | cond)``: ``x [B, *shape]``, ``t [B]`` in ``(0, 1]``, ``cond [B, ...]``
        or None -> ``[B, *shape]``."""
        self.nfe += x.shape[0] * self.evals_per_call
        return self.to_eps(self.predict(x, t, cond), x, t)

    @abc.abstractmethod
    def predict(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """The network (or closed form) behind :meth:`eps`, in :attr:`prediction_type`."""

    def to_eps(self, pred: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """Convert a prediction of :attr:`prediction_type` to ``eps`` (docs/methods.md "Gaussian paths"):
        ``x0``: ``(x - alpha x0) / sigma``; ``v``: ``(sigma x + alpha v) / (alpha^2 + sigma^2)``;
        ``velocity`` ``u``: ``(alpha u - alpha' x) / (alpha sigma' - alpha' sigma)``."""
        if self.prediction_type == "eps":
            return pred
        a, s = self._coefficients(t, x)
        if self.prediction_type == "x0":
            return (x - a * pred) / s
        if self.prediction_type == "v":
            return (s * x + a * pred) / (a ** 2 + s ** 2)
        da, ds = (c.to(x.dtype).view(a.shape) for c in self.schedule.d_alpha_sigma(t.to(torch.float64)))
        return (a * pred - da * x) / (a * ds - da * s)

    def _coefficients(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """``alpha(t), sigma(t)`` in ``x``'s dtype, shaped to broadcast against ``x``."""
        shape = (-1,) + (1,) * (x.dim() - 1)
        t64 = t.to(torch.float64)
        return (self.schedule.alpha(t64).to(x.dtype).view(shape), self.schedule.sigma(t64).to(x.dtype).view(shape))

    def conditional_only(self) -> contextlib.AbstractContextManager:
        """A context in which :meth:`eps` is the network's own prediction at the condition, without classifier-free
        guidance (for losses computed "with CFG in sampling only": adjoint matching's control and adjoint, IIF's
        conditional epsilon loss on Stable Diffusion). The identity for a base model without CFG."""
        return contextlib.nullcontext()

    def null_condition(self, cond: Tensor) -> Tensor:
        """``[B, ...]`` the empty condition in place of each of ``cond`` (adjoint matching's prompt dropout trains
        the network on it); only bases that provide ``"null_condition"`` have one."""
        raise ValueError(f"base model {type(self).__name__} has no empty condition (a text-to-image base has one)")

    def prepare(self) -> None:
        """Load or train whatever the model needs (called once, after the config was validated)."""

    def x0_hat(self, x: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """Tweedie estimate ``(x_t - sigma(t) eps) / alpha(t)`` with ``t [B]``."""
        a, s = self._coefficients(t, x)
        return (x - s * eps) / a

    @property
    def gaussian(self) -> bool:
        """Whether the data law is a single Gaussian, so that every kernel of a chain on this base is affine in
        ``x`` (adjoint sampling needs it); False unless a base knows it."""
        return False

    def data_score(self, x: Tensor, cond: Tensor | None = None, t_min: float = 1e-3) -> Tensor:
        """``grad log p_base(x)`` at clean samples ``x [B, *shape]`` (the target-score estimators need it,
        ``iif.score_targets``). A learned model has no score at ``t = 0``; this is its score at ``t_min``,
        ``-eps(x, t_min) / sigma(t_min)``: an approximation that is poor on data concentrated near a manifold, where
        the score at ``t = 0`` does not exist. Analytic bases override it with the exact score."""
        t = torch.full((x.shape[0],), t_min, dtype=x.dtype, device=x.device)
        _, s = self._coefficients(t, x)
        with torch.no_grad():
            return -self.eps(x, t, cond) / s

    def prior_sample(self, n: int) -> Tensor:
        """``x_T ~ N(0, I)``: ``[n, *shape]`` on :attr:`device` (that device's global torch RNG)."""
        return torch.randn(n, *self.sample_shape, device=self.device)

    def prior_log_prob(self, x: Tensor) -> Tensor:
        """``log N(x_T; 0, I)`` ``[B]`` float64: the start of every path density (:meth:`prior_sample`'s law)."""
        d = x[0].numel()
        r = x.flatten(1).to(torch.float64)
        return -0.5 * (r * r).sum(1) - 0.5 * d * math.log(2 * math.pi)

    def decode(self, x: Tensor) -> Tensor:
        """Samples as rewards and figures see them (pixels): the identity unless the model is a latent model."""
        return x
