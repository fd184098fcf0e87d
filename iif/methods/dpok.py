"""``dpok``: KL-regularised policy gradient over the per-step Gaussian kernels (Fan et al. 2023; docs/methods.md §7.3),
for any base model with per-step kernels."""
from __future__ import annotations

import math

import torch

from iif.buffers.fifo import FIFOBuffer
from iif.methods.base import FineTuned
from iif.methods.optim import Trainer
from iif.nn import TimeMLP
from iif.utils import RunError

Tensor = torch.Tensor


def gaussian_log_prob(x: Tensor, mean: Tensor, sigma: Tensor) -> Tensor:
    """``log N(x; mean, sigma^2 I)`` averaged over the data dimensions (DPOK's convention): ``x, mean [B, *shape]``,
    ``sigma [B]`` -> ``[B]``."""
    sig = sigma.reshape((-1,) + (1,) * (x.dim() - 1))
    lp = -((x - mean) ** 2) / (2 * sig ** 2) - torch.log(sig) - 0.5 * math.log(2 * math.pi)
    return lp.flatten(1).mean(1)


class DPOK(FineTuned):
    """Minimise ``J = E[ -alpha_R r(x_0)/lambda + beta_KL sum_k KL_k(x_k) ]``, ``KL_k(x) = KL(p_theta(.|x) ||
    p_pre(.|x)) = ||Delta_k(x)||^2 / (2 c_k^2)``, by policy gradient on single transitions. Both terms are averaged
    over data dimensions as in DPOK, so with ``reward_weight == kl_weight`` ``J`` is ``KL(P^h || P^0) - E[r]/lambda``
    up to a factor, whose minimiser is the tilted path measure.

    Departure from docs/methods.md §7.3: the KL term is the exact Gaussian KL of the two kernels,
    ``||Delta_k||^2 / (2 c_k^2) = beta_k / (2 alpha_k (1 - alphabar_k)) ||eps_theta - eps_pre||^2``; DPOK's code
    uses ``mean (eps_theta - eps_pre)^2``, which drops that per-step factor and so weights the steps differently
    from the KL it stands for (with it, ``reward_weight == kl_weight`` would not target the tilt).

    Departure from DPOK's value input: the value network sees the transition's condition ``c`` through
    ``conditions.features`` (a one-hot of the class label or of the prompt, the flattened measurement; nothing when
    unconditional), ``V_psi(x_k, c, t_k) = MLP([x_k, features(c), emb(t_k)])``. DPOK feeds the CLIP text embedding of
    the prompt; for a fixed prompt list the one-hot is equivalent (the first layer learns one vector per prompt, and
    the value is never evaluated on another prompt).

    Each outer iteration:

    1. draw ``n`` trajectories of the current policy ``p_theta(x_{k-1}|x_k) = N(mu^0_k + Delta_k, c_k^2)``
       without a graph and score ``r(x_0)``; store every transition ``(x_k, k, x_{k-1}, log p_old, r, C_k)`` in a
       FIFO of the most recent ``transitions`` ones, ``C_k = sum_{j<k} KL_j(x_j)`` the KL of the later steps of the
       same path;
    2. ``value_steps`` steps of ``V_psi(x_k, c, t_k)`` on ``MSE(V_psi, G_k)``, ``G_k`` the return below;
    3. ``grad_steps`` policy steps, each on ``batch_size`` transitions drawn from the FIFO:
       ``adv = G_k - V_psi(x_k, c, t_k)`` (no grad), ``ratio = clamp(exp(log p_theta - log p_old), 1-eps, 1+eps)``,
       ``loss = -alpha_R mean(adv * ratio) + beta_KL mean(||Delta_k||^2 / (2 c_k^2 D))``;
       differentiated: ``h_theta`` at the one sampled ``(x_k, t_k)`` per transition; everything else detached
       (memory ``O(batch)``, independent of the number of steps); with ``micro_batch_size`` the gradient of the
       batch is accumulated over chunks of that many transitions (DPOK's gradient accumulation: the same step).

    The return ``G_k`` (``kl_in_return``):

    * ``False`` (DPOK's published update, Fan et al. 2023, Algorithm 1): ``G_k = r(x_0)/lambda``. Only the reward
      enters the score-function term, so the update omits ``beta_KL E[C_k grad log p_theta(x_{k-1}|x_k)]``: each
      step's effect on the law of the later states, and so on the later KL terms. It is not the gradient of ``J``;
      where the KL of the later steps varies along paths (a state-dependent optimal ``h``), its fixed point is not
      ``J``'s minimiser, so not the tilt (``tests/test_dpok_fixed_point.py``).
    * ``True`` (default): ``G_k = r(x_0)/lambda - (beta_KL / alpha_R) C_k``, the per-step KL as a cost in the return
      (policy-gradient theorem): on-policy (ratio 1) the expected update is ``grad J / (N D)``, so its fixed point is
      ``J``'s minimiser over the policy class. On the toy it weights the modes better than the published update
      (experiments/figure1/README.md#dpok).

    Args:
        n_samples: trajectories per iteration; transitions: FIFO capacity (DPOK: 1000 on SD).
        grad_steps, batch_size: policy updates per iteration and transitions per update.
        micro_batch_size: transitions per forward/backward pass within an update (None: the whole batch).
        reward_weight, kl_weight: ``alpha_R``, ``beta_KL``.
        kl_in_return: put the later steps' KL into the return (above; needs ``reward_weight > 0``).
        ratio_clip: ``eps`` of the ratio clamp (DPOK: 1e-4; clamp, not PPO's min).
        value_steps, value_batch_size, value_optimizer, value_hidden: the value network and its fit.
        optimizer, iterations, lr_final_factor, grad_clip: see ``iif.methods.optim.Trainer``.
    """

    requires = frozenset({"per_step_kernels"})

    def __init__(self, base, reward, sampler, guidance, buffer=None, conditions=None, *, n_samples: int = 256,
                 transitions: int = 25600, grad_steps: int = 20, batch_size: int = 2048, reward_weight: float = 1.0,
                 kl_weight: float = 1.0, kl_in_return: bool = True, ratio_clip: float = 1e-4, value_steps: int = 20,
                 value_batch_size: int = 2048, value_optimizer=None, value_hidden: int = 128, optimizer=None,
                 iterations: int = 1, lr_final_factor: float = 1.0, grad_clip: float = 0.0,
                 micro_batch_size: int | None = None):
        sizes = dict(n_samples=n_samples, transitions=transitions, grad_steps=grad_steps, batch_size=batch_size,
                     value_steps=value_steps, value_batch_size=value_batch_size)
        for name, val in sizes.items():
            if val < 1:
                raise ValueError(f"method.{name} must be >= 1, got {val}")
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError(f"method.micro_batch_size must be >= 1 (or null), got {micro_batch_size}")
        if ratio_clip <= 0 or kl_weight < 0:
            raise ValueError(f"method.ratio_clip must be > 0 and method.kl_weight >= 0, got {ratio_clip}, {kl_weight}")
        if kl_in_return and not reward_weight > 0:
            raise ValueError(f"method.kl_in_return needs method.reward_weight > 0, got {reward_weight}")
        super().__init__(base, reward, sampler, guidance, buffer, conditions, optimizer=optimizer,
                         total_steps=iterations * grad_steps, lr_final_factor=lr_final_factor, grad_clip=grad_clip)
        self.n_samples, self.grad_steps, self.batch_size = n_samples, grad_steps, batch_size
        self.micro_batch_size = min(batch_size, micro_batch_size or batch_size)
        self.reward_weight, self.kl_weight, self.ratio_clip = reward_weight, kl_weight, ratio_clip
        self.kl_in_return = bool(kl_in_return)
        self.value_steps, self.value_batch_size = value_steps, value_batch_size
        self.shape = tuple(base.sample_shape)
        self.dim = math.prod(self.shape)
        self.cond_dim = self.conditions.feature_dim(self.shape)  # F: the width of the condition's features
        self.value = TimeMLP(self.dim + self.cond_dim, 1, hidden=value_hidden, layers=3).to(base.device)
        self.value_trainer = Trainer(self.value, value_optimizer)
        self.transitions = FIFOBuffer(capacity=transitions, prefill=0)
        # per-step kernel coefficients indexed by k = N..1 (index 0 unused): time, variance, shift coefficient
        # (a deterministic, unguided step, e.g. DDIM's last, has no policy: its transitions are not stored)
        kernels = sampler.kernels(base)[::-1]
        self._controlled = torch.tensor([False] + [k.guided and k.std > 0 for k in kernels], device=base.device)
        # a deterministic step gets var = 1 and a shift of 0: its transitions are dropped, the placeholders keep the
        # packing arithmetic finite
        per_step = lambda values: torch.tensor([0.0] + values, dtype=torch.float64).float().to(base.device)  # noqa: E731
        self._t = per_step([k.t for k in kernels])
        self._var = per_step([k.var if k.std > 0 else 1.0 for k in kernels])
        self._coef = per_step([k.shift_coef if k.std > 0 else 0.0 for k in kernels])

    # ------------------------------------------------------------------ transitions, packed as rows
    def _pack(self, traj, log_r: Tensor) -> Tensor:
        """``[N*n, 4D + 4]`` rows ``(x_k, x0_hat_k, mu^0_k, x_{k-1}, k, log p_old, r/lambda, C_k)``, ``C_k`` the KL of
        the path's later steps ``sum_{j<k} ||Delta_j||^2 / (2 c_j^2)`` (``Delta_j = x_{j-1} - c_j z_j - mu^0_j``)."""
        n_steps, n = traj.noises.shape[:2]
        flat = lambda a: a.reshape(n_steps * n, self.dim)  # noqa: E731
        k = torch.arange(n_steps, 0, -1, dtype=torch.float32, device=traj.x0.device).repeat_interleave(n)
        x_prev = traj.states[1:].reshape(n_steps, n, self.dim)
        var = self._var[k.long()].view(n_steps, n)
        old_mean = x_prev - var.sqrt()[..., None] * traj.noises.reshape(n_steps, n, self.dim)  # mu^0 + Delta
        log_p_old = gaussian_log_prob(flat(x_prev), flat(old_mean), var.sqrt().reshape(-1))
        kl = ((old_mean - traj.base_means.reshape(n_steps, n, self.dim)) ** 2).sum(-1) / (2 * var)  # [N, n]
        controlled = self._controlled[k.long()]
        kl = kl * controlled.view(n_steps, n)
        later = kl.flip(0).cumsum(0).flip(0) - kl  # row i (step k = N - i): sum over the rows after i
        rows = torch.cat([flat(traj.states[:-1]), flat(traj.x0_hats), flat(traj.base_means), flat(x_prev),
                          k[:, None], log_p_old[:, None], log_r.float().repeat(n_steps)[:, None],
                          later.reshape(-1, 1)], dim=1)
        return rows if bool(controlled.all()) else rows[controlled]

    def _unpack(self, rows: Tensor):
        """``(x_k, x0_hat_k, mu^0_k, x_{k-1}, k, log p_old, r/lambda)`` of packed rows."""
        d = self.dim
        x, x0_hat, mu0, x_prev = (rows[:, i * d:(i + 1) * d] for i in range(4))
        k = rows[:, 4 * d].long()
        return x, x0_hat, mu0, x_prev, k, rows[:, 4 * d + 1], rows[:, 4 * d + 2]

    def returns(self, rows: Tensor) -> Tensor:
        """``G_k`` of packed rows: ``r/lambda``, minus ``(beta_KL/alpha_R) C_k`` with ``kl_in_return``."""
        r = rows[:, 4 * self.dim + 2]
        if not self.kl_in_return:
            return r
        return r - (self.kl_weight / self.reward_weight) * rows[:, 4 * self.dim + 3]

    def _draw(self, n: int) -> tuple[Tensor, Tensor | None]:
        """``n`` transitions and their conditions from the FIFO (held on the CPU), on the base's device."""
        rows, cond = self.transitions.sample(n)
        device = self.base.device
        return rows.to(device), (None if cond is None else cond.to(device))

    def value_of(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """``V_psi(x, c, t)`` ``[B]`` of flat states ``x [B, D]`` at times ``t [B]`` under conditions ``cond [B, ...]``:
        the network on ``[x, features(cond)]`` (``x`` alone when the conditions have no features)."""
        if self.cond_dim:
            x = torch.cat([x, self.conditions.features(cond).to(x)], dim=1)
        return self.value(x, t).squeeze(-1)

    def policy_loss(self, rows: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Step 3's loss on packed transitions ``rows`` (conditions ``cond``), and the mean per-dimension KL."""
        x, x0_hat, mu0, x_prev, k, log_p_old, _ = self._unpack(rows)
        t, var, coef = self._t[k], self._var[k], self._coef[k]
        with torch.no_grad():
            adv = self.returns(rows) - self.value_of(x, t, cond)
        h = self.guidance(x.view(-1, *self.shape), t, x0_hat.view(-1, *self.shape), cond).flatten(1)
        delta = coef[:, None] * h
        log_p = gaussian_log_prob(x_prev, mu0 + delta, var.sqrt())
        ratio = torch.clamp(torch.exp(log_p - log_p_old), 1 - self.ratio_clip, 1 + self.ratio_clip)
        kl = (delta ** 2).sum(1) / (2 * var * self.dim)
        return -self.reward_weight * (adv * ratio).mean() + self.kl_weight * kl.mean(), kl.mean()

    # ------------------------------------------------------------------ algorithm
    def fit_step(self, iteration: int) -> dict[str, float]:
        # 1. on-policy rollouts, transitions into the FIFO
        traj = self.sampler.sample(self.base, self.guidance, self.n_samples, cond=self.conditions_for(self.n_samples),
                                   keep_states=True)
        log_r = self.reward.log_tilt(traj.x0, traj.cond)
        n_steps = traj.noises.shape[0]
        cond = None if traj.cond is None else traj.cond.repeat(n_steps, *([1] * (traj.cond.dim() - 1)))
        if cond is not None:  # the conditions of the stored (controlled) steps' transitions
            k = torch.arange(n_steps, 0, -1, device=cond.device).repeat_interleave(traj.x0.shape[0])
            cond = cond[self._controlled.to(cond.device)[k]]
        self.transitions.add(self._pack(traj, log_r), cond)
        # 2. value network: V(x_k, c, t_k) ~ G_k
        v_losses = []
        for _ in range(self.value_steps):
            rows, cond = self._draw(self.value_batch_size)
            x, _, _, _, k, _, _ = self._unpack(rows)
            loss = ((self.value_of(x, self._t[k], cond) - self.returns(rows)) ** 2).mean()
            v_losses.append(loss.item())
            self.value_trainer.minimise(loss)
        # 3. policy steps on single transitions
        losses, kls = [], []
        for _ in range(self.grad_steps):
            rows, cond = self._draw(self.batch_size)
            self.trainer.zero_grad()
            loss_sum = kl_sum = 0.0
            for chunk in range(0, self.batch_size, self.micro_batch_size):  # gradient accumulation
                part = slice(chunk, chunk + self.micro_batch_size)
                loss, kl = self.policy_loss(rows[part], None if cond is None else cond[part])
                weight = rows[part].shape[0] / self.batch_size  # the batch's mean loss
                (loss * weight).backward()
                loss_sum, kl_sum = loss_sum + weight * loss.item(), kl_sum + weight * kl.item()
            self.trainer.step()
            losses.append(loss_sum)
            kls.append(kl_sum)
        return {"loss": sum(losses) / len(losses), "value_loss": sum(v_losses) / len(v_losses),
                "step_kl": sum(kls) / len(kls), "kl_path": traj.control_cost.mean().item(),
                "batch_reward_mean": (log_r * self.reward.temperature).mean().item(), "lr": self.trainer.lr,
                "transitions": len(self.transitions)}

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        return {**super().state_dict(), "value": self.value_trainer.state_dict(),
                "transitions": self.transitions.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        saved, own = state["value"]["module"].get("body.0.weight"), self.value.body[0].weight
        if saved is not None and saved.shape != own.shape:
            raise RunError(f"the checkpoint's value network takes {saved.shape[1]} inputs, this run's {own.shape[1]} "
                           f"(state + {self.cond_dim} condition features + time embedding): a checkpoint of another "
                           "condition set, or written before the value network saw the condition; start a new run")
        super().load_state_dict(state)
        self.value_trainer.load_state_dict(state["value"])
        self.transitions.load_state_dict(state["transitions"])
