"""The toy problem's evaluator (``conf/evaluation/toy.yaml``): metrics against the exact tilted target, and the
figure (key names are used by other tools: keep them).

* ``mode_tv``: total variation ``1/2 sum_i |hat p_i - p_i|`` between the histogram of samples over prior modes
  (nearest prior mean) and the exact tilted mode masses ``w_i Z_i / Z``.
* ``energy_distance``: ``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` to exact target samples (U-statistics inside).
* ``reward_mean``: mean raw reward ``E[r(x_0)]``.
* ``top_mode_frac``: fraction of samples at the prior mode of highest reward (the target's share is printed as
  ``top_mode_frac`` of the exact samples in the tests; reward-only fine-tuning drives it towards 1).
* ``log_z_jarzynski``, ``log_z_crooks``, ``log_z_bar``, ``log_z_error_*``, ``kl_gap``, ``work_ess_frac``,
  ``work_forward_mean``, ``work_reverse_mean``, ``sandwich_ok``: log Z of the tilt from the method's path works and
  from ``n_reverse`` exact target paths, against the exact value (``iif.metrics.works``, ``iif.metrics.log_z``);
  absent for samplers without a path density.
* ``sc_loss``: stochastic-control loss estimate ``E[sum_t ||Delta_t||^2 / (2 sigma_t^2) - r(x_0)/lambda]``
  (docs/methods.md §1.2); bounded below by ``-log Z_N``, the log normaliser of the N-step chain's own tilt (about
  ``-log Z`` for large N).
"""
from __future__ import annotations

import torch

from iif.metrics.base import Evaluation, Evaluator
from iif.metrics.log_z import log_z_report, own_log_z_metrics
from iif.metrics.works import forward_works, reverse_works
from iif.plotting import toy_figure
from iif.targets import TiltedGMMTarget

Tensor = torch.Tensor


def mode_histogram(x: Tensor, target: TiltedGMMTarget) -> Tensor:
    """Fraction of samples nearest to each prior mode: ``[K]``."""
    idx = target.prior.nearest_mode(x)
    return torch.bincount(idx, minlength=target.prior.n_components).double() / len(x)


def mode_tv(x: Tensor, target: TiltedGMMTarget) -> float:
    return 0.5 * (mode_histogram(x, target) - target.mode_weights).abs().sum().item()


def energy_distance(x: Tensor, y: Tensor) -> float:
    """Energy distance between samples ``x [n, D]`` and ``y [m, D]`` (0 iff equal in law)."""
    x, y = x.to(torch.float64), y.to(torch.float64)
    n, m = len(x), len(y)
    xy = torch.cdist(x, y).mean()
    xx = torch.cdist(x, x).sum() / (n * (n - 1))
    yy = torch.cdist(y, y).sum() / (m * (m - 1))
    return (2 * xy - xx - yy).item()


class ToyEvaluator(Evaluator):
    """The toy's evaluator: owns the exact tilted target and the figure, samples the method with a fixed evaluation
    seed (the training RNG is untouched) and scores the samples against the target.

    Args:
        base: the toy base model; its data mixture ``base.prior`` is the prior of the target and of the figure.
        reward: the run's GMM reward (its evaluations here are not counted in the training budget).
        n_samples: samples for ``mode_tv``, ``reward_mean``, ``sc_loss``.
        n_energy: samples (of each side) for ``energy_distance``.
        seed: evaluation seed (a run adds its own seed, so seeds differ in their evaluation draws too).
        n_plot: samples drawn in each scatter panel of the figure.
        n_reverse: exact target paths for the reverse (Crooks) works and BAR (0: forward works only).
        n_own: fresh paths for a method's own log Z estimates (``Method.log_z_estimates``: NETS' escorted works;
            0: skip them).
    """

    def __init__(self, base, reward, sampler=None, n_samples: int = 10_000, n_energy: int = 2048, seed: int = 12345,
                 n_plot: int = 4000, n_reverse: int = 2048, n_own: int = 1024):
        if n_samples < 2 or n_energy < 2:
            raise ValueError("evaluation needs at least 2 samples")
        if n_reverse < 0 or n_reverse == 1:
            raise ValueError(f"evaluation.n_reverse must be 0 (forward works only) or >= 2, got {n_reverse}")
        if n_own < 0 or n_own == 1:
            raise ValueError(f"evaluation.n_own must be 0 (off) or >= 2, got {n_own}")
        self.n_samples, self.n_energy, self.seed, self.n_plot = n_samples, n_energy, seed, n_plot
        self.n_reverse, self.n_own = n_reverse, n_own
        self.prior, self.reward = base.prior, reward
        self.target = TiltedGMMTarget(self.prior, reward)

    def __call__(self, method, run_seed: int = 0, figures: bool = False, label: str = "samples") -> Evaluation:
        seed = self.seed + 1000 * run_seed
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            traj = method.sample(self.n_samples)
            ref = self.target.sample(max(self.n_energy, self.n_reverse), generator=torch.Generator().manual_seed(seed + 1))
            w_f = forward_works(traj, self.log_gamma)
            w_r = reverse_works(method, ref[: self.n_reverse], self.log_gamma) if self.n_reverse and w_f is not None else None
            own = own_log_z_metrics(method, self.n_own, float(self.target.log_z))
        x = traj.x0.cpu()  # the exact target and the metrics live on the CPU
        target, reward = self.target, self.reward
        top = int(torch.argmax(reward(target.prior.means)))
        log_tilt = reward.log_tilt(x).double()  # one reward evaluation, checked finite
        metrics = {
            "mode_tv": mode_tv(x, target),
            "top_mode_frac": mode_histogram(x, target)[top].item(),
            "energy_distance": energy_distance(x[: self.n_energy], ref[: self.n_energy]),
            "reward_mean": (log_tilt * reward.temperature).mean().item(),
            "sample_nfe": traj.nfe,  # base evaluations per returned sample (best-of-K: K x steps)
        }
        if traj.control_cost is not None:  # path statistics exist only for samples of one diffusion path
            metrics["sc_loss"] = (traj.control_cost.cpu() - log_tilt).mean().item()
            metrics["kl_path"] = traj.control_cost.mean().item()
        if w_f is not None:
            metrics.update(log_z_report(w_f, w_r, float(target.log_z)).as_metrics())
        metrics.update(own)
        return Evaluation(metrics, x, {"samples": self.figure({label: x})} if figures else {})

    def log_gamma(self, x: Tensor) -> Tensor:
        """``log p_prior(x) + r(x)/lambda``: the unnormalised tilt, whose integral is ``Z``."""
        x = x.to(torch.float64).cpu()
        return self.prior.log_prob(x) + self.reward.gmm.log_prob(x) / self.reward.temperature

    def figure(self, panels: dict[str, Tensor]):
        """Prior samples, the exact tilted density, then one scatter panel per entry of ``panels`` (name: samples
        ``[n, 2]``); the prior's draws use their own seed (0), outside the caller's random state."""
        with torch.random.fork_rng():
            torch.manual_seed(0)
            prior_samples = self.prior.sample(self.n_plot)
        return toy_figure(panels, self.target, prior_samples)
