"""``as``: adjoint sampling (Havens et al. 2025; the unified paper's sampling special case of adjoint matching,
docs/tilting.md §2)."""
from __future__ import annotations

import torch

from iif.methods.base import FineTuned

Tensor = torch.Tensor


class AdjointSampling(FineTuned):
    """Adjoint matching on a base whose chain is affine, with the adjoint transported in closed form, a replay buffer of
    terminal adjoints and bridge resampling of the intermediate states.

    On a Gaussian data law every base kernel mean ``mu^0_k(x) = J_k x + c_k`` is affine, so the lean adjoint of a path
    is ``a_k = M_k^T a_0`` with ``M_k = J_1 ... J_k`` (state-independent; Brownian motion: ``J = I``, the constant
    adjoint of adjoint sampling) and depends on the path only through ``x_0``. Hence:

    1. draw ``N`` samples ``x_0`` of the current model (no graph, no states kept);
    2. terminal adjoints ``a_0 = -grad r(x_0)/lambda`` (one reward gradient per sample; the norm clipped at
       ``max_adjoint_norm``), pushed with ``x_0`` into the buffer;
    3. ``M`` optimiser steps, each on ``b`` buffer pairs ``(x_0, a_0)``, a step ``k`` drawn uniformly among the
       stochastic guided kernels and its state from the base's bridge ``x_k = alpha(t_k) x_0 + sigma(t_k) eps``
       (the memoryless base's ``P(x_k | x_0)``; on the discrete chain an approximation of order the step size):
       ``loss = mean || Delta_k / c_k + c_k M_k^T a_0 ||^2``, ``Delta_k = kernel.shift(h(x_k, t_k))``: adjoint
       matching's pre-step target (``iif.methods.am``), with no simulation and no base evaluation but the guidance's.

    Each reward gradient is reused ``M b / N`` times on average. Differentiated: ``h`` only.

    Args:
        n_samples: ``N`` new samples per iteration; grad_steps: ``M``; batch_size: ``b``.
        max_adjoint_norm: clip ``|a_0|`` (0: off; adjoint sampling's ``max_score_norm``).
        optimizer, iterations, lr_final_factor, grad_clip, ema_decay: see ``iif.methods.optim.Trainer``.
    """

    requires = frozenset({"differentiable_reward", "differentiable_base", "per_step_kernels"})

    def __init__(self, base, reward, sampler, guidance, buffer, conditions=None, *, n_samples: int = 512,
                 grad_steps: int = 100, batch_size: int = 512, max_adjoint_norm: float = 0.0, optimizer=None,
                 iterations: int = 1, lr_final_factor: float = 1.0, grad_clip: float = 0.0, ema_decay: float = 0.0):
        for name, val in dict(n_samples=n_samples, grad_steps=grad_steps, batch_size=batch_size).items():
            if val < 1:
                raise ValueError(f"method.{name} must be >= 1, got {val}")
        if max_adjoint_norm < 0:
            raise ValueError(f"method.max_adjoint_norm must be >= 0, got {max_adjoint_norm}")
        if not base.gaussian:
            raise ValueError("method 'as' needs a base whose chain is affine in x: a Gaussian data law "
                             "(base_model=gmm_exact with a one-component prior, e.g. experiment=sample_gmm)")
        super().__init__(base, reward, sampler, guidance, buffer, conditions, optimizer=optimizer,
                         total_steps=iterations * grad_steps, lr_final_factor=lr_final_factor, grad_clip=grad_clip,
                         ema_decay=ema_decay)
        self.n_samples, self.grad_steps, self.batch_size = n_samples, grad_steps, batch_size
        self.max_adjoint_norm = float(max_adjoint_norm)
        kernels = sampler.kernels(base)
        device = base.device
        self._t = torch.tensor([k.t for k in kernels], device=device)
        self._shift_coef = torch.tensor([k.shift_coef for k in kernels], device=device)
        self._std = torch.tensor([k.std for k in kernels], device=device)
        self._steps = torch.tensor([i for i, k in enumerate(kernels) if k.guided and k.std > 0], device=device)
        if len(self._steps) == 0:
            raise ValueError("method 'as' needs a sampler with stochastic guided steps")
        self._transport = self.transport_matrices(kernels)  # [N, D, D]

    def kernel_jacobian(self, kernel, x: Tensor) -> Tensor:
        """``J [D, D]`` of the kernel's base mean at the states ``x [D, *shape]`` (row ``b``: ``d mu^0_b / dx`` at
        ``x[b]``; one batched vector-Jacobian product)."""
        d = x[0].numel()
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            mu0 = kernel.base_mean(x, self.base.eps(x, kernel.times(d, x.dtype, x.device)))
            eye = torch.eye(d, dtype=x.dtype, device=x.device).view(d, *x.shape[1:])
            (g,) = torch.autograd.grad(mu0, x, eye)
        return g.flatten(1)

    def transport_matrices(self, kernels) -> Tensor:
        """``M [N, D, D]`` with ``a_k = a_0 @ M_k`` (row vectors; ``a_k`` the adjoint at the state before step ``k``):
        ``M_N = I``-side recursion ``M_k = M_{k+1} J_k`` from the last step back. Checks that each kernel is affine
        (the same Jacobian at two states)."""
        shape, device = self.base.sample_shape, self.base.device
        d = torch.Size(shape).numel()
        gen = torch.Generator(device).manual_seed(0)  # the run's random stream is untouched
        probe = [torch.zeros(d, *shape, device=device), 3.0 * torch.randn(d, *shape, device=device, generator=gen)]
        m = torch.eye(d, device=device)
        out = torch.empty(len(kernels), d, d, device=device)
        for i in range(len(kernels) - 1, -1, -1):
            j0, j1 = (self.kernel_jacobian(kernels[i], p) for p in probe)
            if not torch.allclose(j0, j1, rtol=1e-3, atol=1e-5):
                raise ValueError(f"method 'as': the base kernel at t={kernels[i].t:.3g} is not affine in x; adjoint "
                                 "sampling needs a Gaussian data law")
            m = m @ j0
            out[i] = m
        return out

    def fit_step(self, iteration: int) -> dict[str, float]:
        # 1. samples of the current model
        cond = self.conditions_for(self.n_samples)
        with self.trainer.sampling_weights():
            traj = self.sampler.sample(self.base, self.guidance, self.n_samples, cond=cond, accumulate_rnd=False)
        # 2. terminal adjoints, clipped, into the buffer as (x_0, a_0) pairs stacked on dim 1
        a0 = -self.reward.grad_log_tilt(traj.x0, traj.cond).to(traj.x0.dtype)
        norm = a0.flatten(1).norm(dim=1)
        if self.max_adjoint_norm > 0:
            a0 = a0 * (self.max_adjoint_norm / norm.clamp(min=self.max_adjoint_norm)).view(-1, *[1] * (a0.dim() - 1))
        self.buffer.add(torch.stack([traj.x0, a0], dim=1), cond)
        # 3. regression on bridge states
        losses = []
        for _ in range(self.grad_steps):
            pairs, c = self.buffer.sample(self.batch_size)
            loss = self.loss(pairs[:, 0], pairs[:, 1], c)
            self.trainer.minimise(loss)
            losses.append(loss.item())
        return {"loss": sum(losses) / len(losses), "adjoint_norm": norm.mean().item(),
                "clipped_frac": (norm > self.max_adjoint_norm).float().mean().item() if self.max_adjoint_norm else 0.0,
                "buffer_size": len(self.buffer), "lr": self.trainer.lr}

    def loss(self, x0: Tensor, a0: Tensor, cond: Tensor | None = None) -> Tensor:
        """``mean || Delta_k / c_k + c_k M_k^T a_0 ||^2`` over buffer pairs ``x0, a0 [b, *shape]``, one random step
        each, its state from the bridge."""
        device, sched = self.base.device, self.base.schedule
        x0, a0 = x0.to(device), a0.to(device)
        cond = None if cond is None else cond.to(device)
        b, shape = x0.shape[0], (-1,) + (1,) * (x0.dim() - 1)
        i = self._steps[torch.randint(len(self._steps), (b,), device=device)]
        t = self._t[i]
        t64 = t.to(torch.float64)
        xt = (sched.alpha(t64).to(x0.dtype).view(shape) * x0
              + sched.sigma(t64).to(x0.dtype).view(shape) * torch.randn_like(x0))
        adj = torch.bmm(a0.flatten(1)[:, None], self._transport[i])[:, 0].view_as(x0)
        with torch.no_grad():
            x0_hat = self.base.x0_hat(xt, t, self.base.eps(xt, t, cond))
        delta = self._shift_coef[i].view(shape) * self.guidance(xt, t, x0_hat, cond)
        sigma = self._std[i].view(shape)
        return ((delta / sigma + sigma * adj) ** 2).flatten(1).sum(1).mean()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "buffer": self.buffer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.buffer.load_state_dict(state["buffer"])
