"""``iif``: Iterative Importance Fine-tuning (Algorithm 1; docs/methods.md §3–6). ``reward_only`` is this method
with the path Radon–Nikodym term switched off (``use_rnd=false``)."""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from iif.conditions.base import Unconditional
from iif.distributed import world
from iif.importance import relaxed_rejection, solve_log_c_per_group
from iif.methods.base import FineTuned
from iif.score_targets import Conditional, ScoreTarget, regression_error, tilted_score
from iif.time_sampling import UniformTime

Tensor = torch.Tensor


class PiecewiseConstant:
    """``values[j]`` for iterations in ``[boundaries[j-1], boundaries[j])``: e.g. an acceptance schedule."""

    def __init__(self, values: Sequence[float], boundaries: Sequence[int] = ()):
        values, boundaries = list(values), list(boundaries)
        if len(values) != len(boundaries) + 1:
            raise ValueError(f"a schedule with {len(boundaries)} boundaries needs {len(boundaries) + 1} values, "
                             f"got {len(values)}")
        if boundaries != sorted(boundaries):
            raise ValueError(f"schedule boundaries must increase, got {boundaries}")
        self.values, self.boundaries = values, boundaries

    def __call__(self, iteration: int) -> float:
        return self.values[sum(iteration >= b for b in self.boundaries)]


class IIF(FineTuned):
    """Iterative Importance Fine-tuning.

    Each :meth:`fit_step` is one outer iteration ``k`` of Algorithm 1 (in a run of several processes, each runs its
    share of steps 1 and 5 and gathers what steps 2–4 need, so every process holds the same ``c``, accepted set and
    buffer: ``iif.distributed``):

    1. draw ``N`` trajectories of the guided chain ``P^{h_k}``, accumulating ``log RND = log dP^0/dP^{h_k}``;
    2. importance weights ``log w = r(x_0)/lambda + log RND``            ([IIF 11–13]; reward-only: ``r/lambda``);
    3. relaxed rejection ``alpha = min(1, w/c)`` with ``c`` solving ``mean alpha = rho_k`` exactly  ([IIF 14]);
       with ``samples_per_condition``, one ``c`` per condition's group of trajectories (docs/methods.md §3.5);
    4. push the accepted ``x_0`` into the FIFO buffer;
    5. ``M`` Adam steps on ``L_FT(h) = E ||sigma(t)(s_theta(x_t,t) + h(x_t,t)) + eps||^2``          ([IIF 15];
       the conditional score target, or the target/mixed one: ``score_target``, :meth:`loss`)
       ``+ gamma_KL * E[ g(t)^2 / (2 p(t)) ||h(x_t,t)||^2 ]``: the single-time estimate of the path KL
       ``int g^2/2 ||h||^2 dt`` with ``t ~ p`` (KL regulariser, [IIF 17], docs/methods.md §4.3),
       ``(x_0, cond) ~ buffer``, ``t ~ time_sampler``, ``x_t = alpha(t) x_0 + sigma(t) eps``.

    Departures from the paper: NN2 of the reward-informed guidance starts at 0 like NN1, so the first iteration
    samples the base exactly (the paper starts NN2 at a constant on MNIST and at a ramp ``a (1 - t)`` on Flowers,
    docs/methods.md §4.4); ``kl_weight`` defaults to 0 (the paper's value is lost, §4.3).

    Args:
        n_samples: ``N`` trajectories per iteration.
        acceptance: ``rho_k`` schedule (values in ``(0, 1]``).
        grad_steps: ``M`` optimiser steps per iteration; batch_size: ``b``.
        optimizer: a partially-applied ``torch.optim`` class (Hydra ``_partial_``).
        iterations, lr_final_factor: the learning rate decays by a cosine over ``iterations * grad_steps`` steps
            to ``lr_final_factor`` times its initial value (1: constant).
        kl_weight: ``gamma_KL`` (0: off).
        use_rnd: include the path RND in the weights (False: the reward-only ablation).
        time_sampler: draws the training times (default ``t ~ U(1e-3, 1)``; see ``iif.time_sampling``).
        ema_decay: if > 0, sample with an exponential moving average of the guidance weights.
        cfg_in_loss: step 5 with the base's classifier-free guidance (the CFG-combined noise prediction regressed
            on ``eps``); False: with the conditional network alone (``base.conditional_only()``), so with a LoRA
            ``h`` the loss is the standard conditional epsilon loss ``||eps - eps_phi(x_t, t | c)||^2`` on
            accepted samples (docs/methods.md §8.4). Sampling (steps 1-2) always uses the base's CFG.
        score_target: the regression target of step 5 (``iif.score_targets``): ``Conditional`` (default, the
            paper's), ``TargetScore`` or ``Mixed`` (both need the reward's gradient at the buffer's samples and the
            base's data score, docs/tilting.md §3).
        samples_per_condition: ``G >= 2``: step 1 draws ``N / G`` conditions, each for ``G`` trajectories, and
            step 3 solves one ``c`` per condition, which cancels the condition's normaliser ``Z(y)`` in the weights
            (docs/methods.md §3.5); None (default): a condition per trajectory and one ``c`` (the paper's).
    """

    requires = frozenset({"per_step_kernels"})  # the path RND (reward_only too: it shares the sampler path)
    data_parallel = True

    def __init__(self, base, reward, sampler, guidance, buffer, conditions=None, *, n_samples: int = 2048,
                 acceptance: PiecewiseConstant | float = 0.3, grad_steps: int = 100, batch_size: int = 512,
                 optimizer=None, iterations: int = 1, lr_final_factor: float = 1.0, kl_weight: float = 0.0,
                 use_rnd: bool = True, time_sampler=None, ema_decay: float = 0.0, cfg_in_loss: bool = True,
                 score_target: ScoreTarget | None = None, samples_per_condition: int | None = None):
        for name, val in dict(n_samples=n_samples, grad_steps=grad_steps, batch_size=batch_size).items():
            if val < 1:
                raise ValueError(f"method.{name} must be >= 1, got {val}")
        if samples_per_condition is not None:
            if samples_per_condition < 2 or n_samples % samples_per_condition:
                raise ValueError(f"method.samples_per_condition must be >= 2 and divide method.n_samples "
                                 f"({n_samples}), got {samples_per_condition}")
            if isinstance(conditions or Unconditional(), Unconditional):
                raise ValueError("method.samples_per_condition groups the trajectories of a condition; conditions=none "
                                 "has none (leave it null)")
        self.samples_per_condition = samples_per_condition
        super().__init__(base, reward, sampler, guidance, buffer, conditions, optimizer=optimizer,
                         total_steps=iterations * grad_steps, lr_final_factor=lr_final_factor, ema_decay=ema_decay)
        if kl_weight < 0:
            raise ValueError(f"method.kl_weight must be >= 0, got {kl_weight}")
        self.acceptance = acceptance if callable(acceptance) else PiecewiseConstant([acceptance])
        for rho in self.acceptance.values:
            if not 0 < rho <= 1:
                raise ValueError(f"method.acceptance must lie in (0, 1], got {rho}")
        world().check_divisible("method.batch_size", batch_size)
        self.n_samples, self.grad_steps, self.batch_size = n_samples, grad_steps, batch_size
        self.kl_weight, self.use_rnd = kl_weight, use_rnd
        self.time_sampler = time_sampler or UniformTime()
        self.cfg_in_loss = bool(cfg_in_loss)
        self.score_target = score_target or Conditional()
        if self.score_target.needs_target_score and not reward.differentiable:
            raise ValueError(f"method.score_target {self.score_target.name} needs the reward's gradient; reward "
                             f"'{reward.name}' is not differentiable (use iif.score_targets.Conditional)")

    # ------------------------------------------------------------------ algorithm
    def setup(self) -> None:
        if self.buffer.prefill > 0:  # the buffer starts with samples of the pretrained model [V-paper]
            n, ranks = self.buffer.prefill, world()

            def draw(cond):
                cond = None if cond is None else cond.to(self.base.device)
                return ranks.gather(self.sampler.sample(self.base, None, n, cond=cond, rows=ranks.shard(n)).x0, n)

            x0, cond = self.conditions.base_pairs(n, draw)  # measurements: each x_0 with its own y
            self.buffer.add(x0, cond)

    def fit_step(self, iteration: int) -> dict[str, float]:
        rho, ranks, n = self.acceptance(iteration), world(), self.n_samples
        # 1. on-policy trajectories with the on-the-fly log-RND (no gradients): this process's rows of the N; with
        #    samples_per_condition = G, N/G conditions, each for G consecutive rows
        group = self.samples_per_condition or n
        cond = self.conditions_for(n) if self.samples_per_condition is None else \
            self.conditions_for(n // group).repeat_interleave(group, 0)
        with self.trainer.sampling_weights():
            traj = self.sampler.sample(self.base, self.guidance, n, cond=cond, accumulate_rnd=self.use_rnd,
                                       rows=ranks.shard(n))
        # 2. importance weights, of all N trajectories (gathered from every process)
        x0 = ranks.gather(traj.x0, n)
        log_r = ranks.gather(self.reward.log_tilt(traj.x0, traj.cond), n)
        log_rnd = ranks.gather(traj.log_rnd, n)
        log_w = log_r + log_rnd if self.use_rnd else log_r.to(torch.float64)
        # 3. relaxed rejection with the adaptive constant, one per group of a condition (the same draws in every
        #    process)
        log_c = solve_log_c_per_group(log_w, rho, group)
        keep = relaxed_rejection(log_w, log_c)
        # 4. replay buffer (samples with their conditions)
        self.buffer.add(x0[keep], None if cond is None else cond[keep])
        # 5. supervised h-transform update: every process draws the whole minibatch and takes its rows; the
        #    trainer averages the gradients over the processes
        losses = []
        for _ in range(self.grad_steps):
            loss = self.loss(*self.buffer.sample(self.batch_size), rows=ranks.shard(self.batch_size))
            self.trainer.minimise(loss)
            losses.append(loss.item())
        loss_mean = ranks.mean({"loss": sum(losses) / len(losses)})["loss"]
        w = torch.softmax(log_w.view(-1, group), 1)  # [N / G, G]: each group's self-normalised weights
        return {
            "accept_rate": keep.double().mean().item(), "target_accept_rate": rho, "log_c": log_c.mean().item(),
            "ess_frac": (1.0 / (w ** 2).sum(1) / group).mean().item(),
            "frac_w_above_c": (log_w > log_c).double().mean().item(),
            "log_rnd_mean": log_rnd.mean().item(),
            "batch_reward_mean": (log_r * self.reward.temperature).mean().item(),
            "loss": loss_mean, "buffer_size": len(self.buffer),
            "lr": self.trainer.lr,
        }

    def loss(self, x0: Tensor, cond: Tensor | None = None, rows: slice = slice(None)) -> Tensor:
        """``L_FT`` (+ ``gamma_KL R_KL``) on a buffer minibatch ``x0 [b, *shape]`` with its conditions ``cond [b, ...]``
        (or None); differentiates ``h`` only.

        ``L_FT = E sigma(t)^2 ||h(x_t, t) - (Y - s_base(x_t, t))||^2`` with ``Y`` the score target
        (``iif.score_targets.regression_error``); for the default conditional target ``Y = -eps / sigma`` this is
        ``E ||sigma(t)(s_theta(x_t, t) + h(x_t, t)) + eps||^2`` ([IIF 15]).

        ``rows``: the loss of only these rows (one process's share); the times and noises of all ``b`` rows are
        drawn, so the rows are those of the whole minibatch.
        """
        sched, device = self.base.schedule, self.base.device
        x0 = x0.to(device)  # the buffer keeps its samples on the CPU
        t = self.time_sampler(x0.shape[0], sched).to(device)
        eps = torch.randn_like(x0)
        x0, t, eps = x0[rows], t[rows], eps[rows]
        cond = None if cond is None else cond.to(device)[rows]
        t64 = t.to(torch.float64)
        score = tilted_score(self.base, self.reward, x0, cond) if self.score_target.needs_target_score else None
        with contextlib.nullcontext() if self.cfg_in_loss else self.base.conditional_only():
            err, h = regression_error(self.base, self.guidance, self.score_target, x0, t, eps, cond, score)
        sm = (sched.sigma(t64).to(err.dtype) ** 2 * err).mean()
        if self.kl_weight == 0:
            return sm
        weight = 0.5 * sched.diffusion_sq(t64) / self.time_sampler.density(t64, sched)
        kl = (weight.float() * (h ** 2).flatten(1).sum(-1)).mean()
        return sm + self.kl_weight * kl

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        return {**super().state_dict(), "buffer": self.buffer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.buffer.load_state_dict(state["buffer"])
