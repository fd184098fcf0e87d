"""``am``: adjoint matching (Domingo-Enrich et al., ICLR 2025; docs/methods.md §7.4, docs/methods.md §U2.1)."""
from __future__ import annotations

import contextlib

import torch

from iif.distributed import world
from iif.methods.base import FineTuned
from iif.samplers.base import Trajectory

Tensor = torch.Tensor

TARGETS = ("post", "pre")


class AdjointMatching(FineTuned):
    """Regress the control onto the lean adjoint of detached trajectories.

    Each optimiser step:

    1. draw ``b`` trajectories of the current model without a graph (states ``x_N..x_0`` kept);
    2. ``a_0 = -grad r(x_0)/lambda``                                               (terminal adjoint)
    3. for ``k = 1..N``: ``a_k = J_k(x_k)^T a_{k-1}``, ``J_k = d mu^0_k / d x``: one vector-Jacobian product of the
       **base** mean per step (the lean adjoint; the graph of each VJP is freed at once);
    4. at ``S`` steps per trajectory, drawn without replacement among the stochastic guided kernels,
       ``loss = mean || Delta_k / c_k + c_k a ||^2`` with ``Delta_k = kernel.shift(h(x_k, t_k))``
       (``sqrt(dt) u = Delta / c``) and ``a`` the adjoint chosen by ``target``:

       * ``post``: ``a = a_{k-1}``, the adjoint at the state the step produces (``a_0`` for the last
         step). Fixed point: ``Delta_k(x) = c_k^2 E[grad log V_{k-1}(x_{k-1}) | x_k = x]`` with
         ``V_{k-1}(y) = E^0[e^{r(x_0)/lambda} | x_{k-1} = y]``, the mean shift of the tilted path measure's kernel
         (Gaussian integration by parts), i.e. each tilted kernel's Gaussian moment projection; exact where the
         tilted kernels are Gaussian (Gaussian data, linear reward: ``tests/test_am_discrete.py``);
       * ``pre`` (default): ``a = a_k``, the adjoint at the state the control acts at. This is AM's published
         discretisation (Domingo-Enrich et al. 2025, Algorithm 1: ``sum_t ||u(X_t, t) + sigma(t)^T a(t; X)||^2``
         over the time grid, ``a`` solved backwards on the same grid). Its fixed point is the post-step one
         multiplied by ``J_k^T``: it tends to the tilt as the steps shrink (``J_k -> I``) but not on a fixed grid
         (on the VP path at the noisiest step, ``J_N ~ 0.905 I`` for ``N = 100`` and ``0.39 I`` for ``N = 10``).
         On the toy the two tie at 100 steps, and at 10 steps ``pre`` weights the modes better while ``post``
         reaches a lower SC loss (experiments/figure1/README.md#am), so the default stays AM's form.

       Terms whose ``sqrt`` exceeds an EMA of the batch's ``clip_quantile`` quantile are zeroed (AM's per-sample
       clipping; ``clip_quantile = 1`` disables it);
    5. clip, step; with ``accumulate = m`` steps 1–4 run on ``m`` fresh batches and the step takes the mean of their
       gradients (AM's SD setting: 25 batches of 5 trajectories).

    ``cfg_in_loss = False`` (AM's Stable Diffusion setting, "CFG in sampling only"): trajectories are drawn with the
    base's classifier-free guidance, while steps 3 and 4 use the conditional network alone (``base.conditional_only()``:
    the adjoint through the unguided base, the control as the difference of the unguided fine-tuned and base
    predictions); a base without CFG is unaffected.

    ``prompt_dropout = p`` (AM's SD setting 0.2): with probability ``p`` per optimiser step, step 4 evaluates the
    control at the empty condition (``base.null_condition``) instead of each trajectory's prompt, the trajectories
    and adjoints unchanged, so the fine-tuned network's unconditional branch, which CFG sampling uses, is trained too.

    The DDPM chain with ``c_k^2 = beta_k`` on every step stands in for AM's memoryless schedule (at least the
    variance of DDIM with ``eta = 1``; docs/methods.md §7.4).

    Differentiated: ``h`` at the ``S`` selected ``(x_k, t_k)`` only; trajectories, adjoints, base outputs and the
    reward are detached. Memory: ``O(N b D)`` for stored states and adjoints, activations for ``S`` steps only.

    Args:
        batch_size: ``b`` trajectories per batch; grad_steps: optimiser steps per outer iteration.
        accumulate: batches per optimiser step (gradient accumulation).
        loss_steps: ``S``, steps per trajectory in the loss (at most the sampler's ``N``).
        target: ``post`` or ``pre``, the adjoint each step is regressed on (step 4).
        clip_quantile, clip_ema: per-term clipping threshold (quantile of the batch, EMA decay of the threshold).
        cfg_in_loss: evaluate the base (adjoint) and the control (loss) with the base's classifier-free guidance.
        prompt_dropout: probability of the empty condition in step 4 (needs a base that provides one).
        optimizer, iterations, lr_final_factor, grad_clip, ema_decay: see ``iif.methods.optim.Trainer``.
    """

    requires = frozenset({"differentiable_reward", "differentiable_base", "per_step_kernels"})
    data_parallel = True  # each process regresses its rows; the clipping quantile is the whole batch's

    def __init__(self, base, reward, sampler, guidance, buffer=None, conditions=None, *, batch_size: int = 512,
                 grad_steps: int = 10, accumulate: int = 1, loss_steps: int = 20, target: str = "pre",
                 clip_quantile: float = 0.9, clip_ema: float = 0.9, cfg_in_loss: bool = True,
                 prompt_dropout: float = 0.0, optimizer=None, iterations: int = 1, lr_final_factor: float = 1.0,
                 grad_clip: float = 0.0, ema_decay: float = 0.0):
        if min(batch_size, grad_steps, loss_steps, accumulate) < 1:
            raise ValueError(f"method.batch_size, grad_steps, loss_steps and accumulate must be >= 1, got "
                             f"{batch_size}, {grad_steps}, {loss_steps}, {accumulate}")
        if loss_steps > sampler.n_steps:
            raise ValueError(f"method.loss_steps={loss_steps} exceeds the sampler's n_steps={sampler.n_steps}")
        if target not in TARGETS:
            raise ValueError(f"method.target must be one of {', '.join(TARGETS)}, got '{target}'")
        if not 0 < clip_quantile <= 1 or not 0 <= clip_ema < 1:
            raise ValueError(f"method.clip_quantile must lie in (0, 1] and clip_ema in [0, 1), got {clip_quantile}, "
                             f"{clip_ema}")
        if not 0 <= prompt_dropout < 1:
            raise ValueError(f"method.prompt_dropout must lie in [0, 1), got {prompt_dropout}")
        if prompt_dropout > 0 and "null_condition" not in base.provides:
            raise ValueError(f"method.prompt_dropout={prompt_dropout} needs a base model with an empty condition "
                             f"(a text-to-image base); {type(base).__name__} has none: set it to 0")
        super().__init__(base, reward, sampler, guidance, buffer, conditions, optimizer=optimizer,
                         total_steps=iterations * grad_steps, lr_final_factor=lr_final_factor, grad_clip=grad_clip,
                         ema_decay=ema_decay)
        world().check_divisible("method.batch_size", batch_size)
        self.batch_size, self.grad_steps, self.loss_steps = batch_size, grad_steps, loss_steps
        self.accumulate = int(accumulate)
        self.target = target
        self.clip_quantile, self.clip_ema = clip_quantile, clip_ema
        self.clip_threshold: float | None = None
        self.cfg_in_loss = bool(cfg_in_loss)
        self.prompt_dropout = float(prompt_dropout)
        kernels = sampler.kernels(base)  # index i: the step x_{N-i} -> x_{N-i-1}
        self._t = torch.tensor([k.t for k in kernels], device=base.device)
        self._shift_coef = torch.tensor([k.shift_coef for k in kernels], device=base.device)
        self._std = torch.tensor([k.std for k in kernels], device=base.device)
        # the steps the control acts on: stochastic guided kernels (e.g. not DDIM's deterministic last step)
        self._controlled = torch.tensor([k.guided and k.std > 0 for k in kernels], device=base.device)
        if loss_steps > int(self._controlled.sum()):
            raise ValueError(f"method.loss_steps={loss_steps} exceeds the sampler's {int(self._controlled.sum())} "
                             "stochastic guided steps")

    def lean_adjoint(self, traj: Trajectory) -> Tensor:
        """``[N+1, b, *shape]``: ``a`` at the states ``x_N, ..., x_0`` (index ``i`` is the state before step ``i``,
        ``i + 1`` the state after it; the last row is ``a_0 = -grad r(x_0)/lambda``), backwards through the
        deterministic part of the base chain: ``a_k = (d mu^0_k / d x)(x_k)^T a_{k-1}``."""
        a = -self.reward.grad_log_tilt(traj.x0, traj.cond).to(traj.x0.dtype)
        kernels = self.sampler.kernels(self.base)
        out = torch.empty_like(traj.states)
        out[-1] = a
        for i in range(len(kernels) - 1, -1, -1):
            k = kernels[i]
            with torch.enable_grad(), self._loss_network():
                x = traj.states[i].detach().requires_grad_(True)
                mu0 = k.base_mean(x, self.base.eps(x, k.times(x.shape[0], x.dtype, x.device), traj.cond))
                (a,) = torch.autograd.grad(mu0, x, a)
            out[i] = a
        return out

    @staticmethod
    def adjoint_growth(a: Tensor) -> Tensor:
        """The lean adjoint's growth along each path, ``sup_k |a_k| / |a_0|`` ``[b]`` from ``a [N+1, b, *shape]``
        (docs/tilting.md §5: bounded by ``1/alpha``-type factors on log-concave bases, large near a bimodal base's
        separatrix); logged as its median and maximum over the batch."""
        norms = a.flatten(2).norm(dim=2)  # [N+1, b]
        return (norms / norms[-1].clamp(min=1e-12)).amax(dim=0)

    def _loss_network(self) -> contextlib.AbstractContextManager:
        """The base's CFG (``cfg_in_loss``) or its conditional network alone, for the adjoint and the control."""
        return contextlib.nullcontext() if self.cfg_in_loss else self.base.conditional_only()

    def regressed_adjoint(self, a: Tensor) -> Tensor:
        """``[N, b, *shape]``: the adjoint step ``i`` is regressed on, from the lean adjoint ``a [N+1, b, *shape]``:
        ``a[i + 1]`` (``post``, the state after the step) or ``a[i]`` (``pre``, the state before it)."""
        if a.shape[0] != len(self._t) + 1:
            raise ValueError(f"expected the lean adjoint at all {len(self._t) + 1} states x_N..x_0, got {a.shape[0]} "
                             "rows")
        return a[1:] if self.target == "post" else a[:-1]

    def fit_step(self, iteration: int) -> dict[str, float]:
        losses, kept, norms, adj, growth = [], [], [], [], []
        rows = world().shard(self.batch_size)
        for _ in range(self.grad_steps):
            self.trainer.zero_grad()
            for _ in range(self.accumulate):  # AM's gradient accumulation: the mean gradient of several batches
                # 1. detached trajectories of the current model (this process's rows)
                with self.trainer.sampling_weights():
                    traj = self.sampler.sample(self.base, self.guidance, self.batch_size, keep_states=True,
                                               cond=self.conditions_for(self.batch_size), rows=rows)
                # 2.-3. terminal reward gradient and the lean adjoint
                a = self.lean_adjoint(traj)
                # 4. regression at S steps per trajectory
                loss, frac = self.loss(traj, a, rows)
                (loss / self.accumulate).backward()
                losses.append(loss.item())
                kept.append(frac)
                adj.append(a[0].flatten(1).norm(dim=1).mean().item())
                growth.append(world().gather(self.adjoint_growth(a), self.batch_size))  # every process's paths
            # 5. step
            norms.append(self.trainer.step())
        n = len(losses)
        logged = world().mean({"loss": sum(losses) / n, "kept_frac": sum(kept) / n, "adjoint_norm_t1": sum(adj) / n})
        logged["adjoint_growth_median"] = sum(g.median().item() for g in growth) / n
        logged["adjoint_growth_max"] = max(g.max().item() for g in growth)
        return {**logged, "grad_norm": sum(norms) / len(norms), "lr": self.trainer.lr,
                "clip_threshold": self.clip_threshold if self.clip_threshold is not None else float("nan")}

    def loss(self, traj: Trajectory, a: Tensor, rows: slice | None = None) -> tuple[Tensor, float]:
        """The clipped adjoint-matching loss on ``S`` random steps per trajectory, and the fraction of terms kept;
        ``a [N+1, b, *shape]`` is the lean adjoint (:meth:`lean_adjoint`), of which each step takes the row chosen
        by ``target`` (:meth:`regressed_adjoint`).

        ``rows``: the rows of the whole batch (``batch_size``) that ``traj`` holds (one process's share): the steps
        of every row are drawn, so the rows get the steps they get in the whole batch (None: ``traj`` is the batch).
        """
        a = self.regressed_adjoint(a)
        n_steps, b = a.shape[:2]
        n_total = b if rows is None else self.batch_size
        # S of the controlled steps per row, without replacement (uncontrolled steps sort last)
        keys = torch.rand(n_total, n_steps, device=a.device) + (~self._controlled).float()
        idx = keys.argsort(dim=1)[:, : self.loss_steps]  # [n_total, S]
        idx = idx if rows is None else idx[rows]  # [b, S]
        cols = torch.arange(b, device=a.device)[:, None].expand_as(idx)
        x, x0_hat, adj = traj.states[idx, cols], traj.x0_hats[idx, cols], a[idx, cols]  # [b, S, *shape]
        flat = lambda y: y.reshape(b * self.loss_steps, *y.shape[2:])  # noqa: E731
        i = idx.reshape(-1)
        shape = (-1,) + (1,) * (x.dim() - 2)
        cond = None if traj.cond is None else traj.cond.repeat_interleave(self.loss_steps, dim=0)
        # prompt dropout: one draw per step from the run's shared stream, so every process drops alike
        if self.prompt_dropout > 0 and cond is not None and float(torch.rand(())) < self.prompt_dropout:
            cond = self.base.null_condition(cond)
        with self._loss_network():
            h = self.guidance(flat(x), self._t[i], flat(x0_hat), cond)
        delta = self._shift_coef[i].view(shape) * h
        sigma = self._std[i].view(shape)
        terms = ((delta / sigma + sigma * flat(adj)) ** 2).flatten(1).sum(1)  # [b*S]
        if self.clip_quantile >= 1:
            return terms.mean(), 1.0
        with torch.no_grad():  # the quantile of the whole batch's terms (every process's)
            q = torch.quantile(world().gather(terms.sqrt(), n_total * self.loss_steps), self.clip_quantile).item()
            self.clip_threshold = q if self.clip_threshold is None else (
                self.clip_ema * self.clip_threshold + (1 - self.clip_ema) * q)
            keep = terms.sqrt() < self.clip_threshold
        return (terms * keep).mean(), keep.float().mean().item()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "clip_threshold": self.clip_threshold}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.clip_threshold = state["clip_threshold"]
