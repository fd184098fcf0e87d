"""The sampling problems' evaluator (``conf/evaluation/energy.yaml``): a method's samples against the Boltzmann
density ``exp(-E) / Z`` of the run's energy (``iif.rewards.energy``), and log Z from the method's path works.

* ``energy_distance``: to exact samples of the target (as the toy's).
* ``energy_mean`` and ``energy_mean_error``: ``E[E(x)]`` of the samples, and minus that of exact samples.
* ``mode_tv``: total variation between the samples' and the target's masses per mode (energies with modes).
* ``log_z_jarzynski``, ``log_z_crooks``, ``log_z_bar`` and their signed errors ``log_z_error_*`` against the
  energy's exact (or reference) ``log Z``; ``work_forward_mean <= log Z <= work_reverse_mean`` (``sandwich_ok``);
  ``kl_gap = log Z_hat - work_forward_mean`` (the path KL of the method to the target path law); ``work_ess_frac`` of
  the forward works (``iif.metrics.works``, ``iif.metrics.log_z``).
* ``sc_loss``, ``kl_path``, ``sample_nfe``: as the toy's.
"""
from __future__ import annotations

import torch

from iif.metrics.base import Evaluation, Evaluator
from iif.metrics.log_z import log_z_report, own_log_z_metrics
from iif.metrics.toy import energy_distance
from iif.metrics.works import forward_works, reverse_works
from iif.plotting import toy_figure

Tensor = torch.Tensor


class _Boltzmann:
    """``exp(-E) / Z`` with the figure's interface (``log_prob``)."""

    def __init__(self, energy):
        self.energy = energy

    def log_prob(self, x: Tensor) -> Tensor:
        return -self.energy(x) - self.energy.log_z


class EnergyEvaluator(Evaluator):
    """Scores a method on a sampling problem.

    Args:
        base: the analytic Gaussian base (its data law ``base.prior`` is ``p_base``).
        reward: the run's :class:`~iif.rewards.energy.EnergyReward` at temperature 1 (the target is then
            ``exp(-E) / Z``).
        n_samples: samples of the method (metrics and forward works); n_reverse: exact target paths for Crooks and
            BAR (0: forward only); n_energy: samples of each side for ``energy_distance``.
        seed: evaluation seed (plus 1000 x the run's seed).
        n_plot: samples per scatter panel.
        n_own: fresh paths for a method's own log Z estimates (``Method.log_z_estimates``: NETS' escorted works;
            0: skip them).
    """

    def __init__(self, base, reward, sampler=None, n_samples: int = 10_000, n_reverse: int = 4096,
                 n_energy: int = 2048, seed: int = 12345, n_plot: int = 4000, n_own: int = 1024):
        energy = getattr(reward, "energy", None)
        if energy is None:
            raise ValueError(f"evaluation 'energy' needs an energy reward (reward=gmm_energy, gaussian_energy, "
                             f"double_well, gmm10d_energy), got '{reward.name}'")
        if reward.temperature != 1.0:
            raise ValueError(f"evaluation 'energy' scores against exp(-E)/Z, the tilt at reward.temperature=1; got "
                             f"{reward.temperature}")
        if n_samples < 2 or n_energy < 2:
            raise ValueError("evaluation needs at least 2 samples")
        if n_reverse < 0 or n_reverse == 1:
            raise ValueError(f"evaluation.n_reverse must be 0 (forward works only) or >= 2, got {n_reverse}")
        if n_own < 0 or n_own == 1:
            raise ValueError(f"evaluation.n_own must be 0 (off) or >= 2, got {n_own}")
        self.energy, self.reward, self.base = energy, reward, base
        self.n_samples, self.n_reverse, self.n_energy = n_samples, n_reverse, n_energy
        self.seed, self.n_plot, self.n_own = seed, n_plot, n_own

    def log_gamma(self, x: Tensor) -> Tensor:
        """``log p_base(x) + r(x) = -E(x)``, computed as ``-E`` (no cancellation)."""
        return -self.energy(x.to(torch.float64))

    def __call__(self, method, run_seed: int = 0, figures: bool = False, label: str = "samples") -> Evaluation:
        seed = self.seed + 1000 * run_seed
        gen = torch.Generator().manual_seed(seed + 1)
        ref = self.energy.sample(max(self.n_energy, self.n_reverse), generator=gen)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            traj = method.sample(self.n_samples)
            w_f = forward_works(traj, self.log_gamma)
            w_r = reverse_works(method, ref[: self.n_reverse], self.log_gamma) if self.n_reverse else None
            own = own_log_z_metrics(method, self.n_own, float(self.energy.log_z))
        x = traj.x0.detach().cpu().double()
        e = self.energy(x)
        metrics = {
            "energy_distance": energy_distance(x[: self.n_energy], ref[: self.n_energy]),
            "energy_mean": e.mean().item(),
            "energy_mean_error": (e.mean() - self.energy(ref).mean()).item(),
            "reward_mean": self.reward(x).double().mean().item(),
            "sample_nfe": traj.nfe,
            "log_z_exact": float(self.energy.log_z),
        }
        if self.energy.modes is not None:
            hist = torch.bincount(self.energy.mode_of(x), minlength=len(self.energy.mode_weights)).double() / len(x)
            metrics["mode_tv"] = 0.5 * (hist - self.energy.mode_weights).abs().sum().item()
        if traj.control_cost is not None:
            metrics["sc_loss"] = (traj.control_cost.cpu() - self.reward.log_tilt(x).double()).mean().item()
            metrics["kl_path"] = traj.control_cost.mean().item()
        if w_f is not None:
            metrics.update(log_z_report(w_f, w_r, self.energy.log_z).as_metrics())
        metrics.update(own)
        return Evaluation(metrics, x, {"samples": self.figure({label: x})} if figures else {})

    def figure(self, panels: dict[str, Tensor]):
        """Base samples, the target (its density in 2-D, else exact samples; the first two coordinates), then one
        panel per entry of ``panels`` (name: samples ``[n, D]``); draws with their own seed (0)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            base_samples = self.base.prior.sample(self.n_plot)
        if self.energy.dim == 2:
            return toy_figure(panels, _Boltzmann(self.energy), base_samples)
        exact = self.energy.sample(self.n_plot, generator=torch.Generator().manual_seed(0))
        return toy_figure({"exact target samples": exact, **panels}, None, base_samples, density=False)
