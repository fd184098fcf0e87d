"""``brownian``: the Brownian base with a point start, adjoint sampling's reference process (Havens et al. 2025;
docs/tilting.md §1, "The Brownian base"): ``X_0 = 0``, ``dX = sigma_B dB`` in generative time, so its data law is
``N(0, nu_1 I)``, ``nu_1 = int sigma_B^2`` (constant or geometric ``sigma_B``), on the Brownian-bridge path
(:class:`~iif.schedules.brownian.BrownianBridge`). Sampled by ``sampler=brownian`` (zero drift: the chain needs no network)."""
from __future__ import annotations

import torch

from iif.base_models.gmm_exact import GMMExact
from iif.gmm import GMM
from iif.schedules.brownian import BrownianBridge

Tensor = torch.Tensor


class BrownianBase(GMMExact):
    """The Gaussian base ``N(0, nu_1 I)`` reached by Brownian motion from 0: closed-form scores, density and samples
    (as :class:`GMMExact`) on the Brownian-bridge path.

    At ``t = 1`` (the start, ``alpha = sigma = 0``) the noise prediction is 0 (the state is 0), and the Tweedie
    estimate is the state itself at every time: ``E[X_1 | X_tau = x] = x`` (a martingale), which is also
    ``(x - sigma eps)/alpha`` wherever that is defined.

    Args:
        prior: ``N(0, nu_1 I)``: a one-component, zero-mean, isotropic GMM (the experiments' ``prior``).
        noise_ratio: ``sigma_max / sigma_min`` of adjoint sampling's geometric noise schedule ``sigma_B(tau)``; 1:
            constant (:class:`~iif.schedules.brownian.BrownianBridge`).
    """

    def __init__(self, prior: GMM, noise_ratio: float = 1.0):
        cov = prior.covs[0] if prior.n_components == 1 else None
        if (cov is None or prior.means.abs().max() > 0
                or not torch.allclose(cov, cov[0, 0] * torch.eye(prior.dim, dtype=cov.dtype))):
            raise ValueError("base_model=brownian needs prior N(0, s^2 I): one component, zero mean, isotropic "
                             "(e.g. experiment=sample_gaussian or sample_gmm)")
        super().__init__(prior, BrownianBridge(float(cov[0, 0]), noise_ratio))

    def prior_sample(self, n: int) -> Tensor:
        """The point start ``x_T = 0``."""
        return torch.zeros(n, *self.sample_shape, device=self.device)

    def prior_log_prob(self, x: Tensor) -> Tensor:
        """0: the start is a point mass, shared by every path law on this base (its density cancels in every ratio)."""
        return torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)

    def predict(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """``eps = sigma(t) x / nu_tau`` (``X_tau ~ N(0, nu_tau I)``), 0 at the start."""
        t64 = t.to(torch.float64)
        nu = self.schedule.nu(t64)
        scale = torch.where(nu > 0, self.schedule.sigma(t64) / nu.clamp(min=1e-300), torch.zeros_like(nu))
        return (scale.view(-1, *[1] * (x.dim() - 1)) * x.double()).to(x.dtype)

    def x0_hat(self, x: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        return x
