"""``image``: the evaluator of image (and latent) models without an exact target: the reward, the path statistics and
a grid of samples (decoded to pixels for a latent model)."""
from __future__ import annotations

import math

import torch

from iif.metrics.base import Evaluation, Evaluator

Tensor = torch.Tensor


def image_grid(x: Tensor, title: str = ""):
    """A matplotlib figure of images ``[n, C, H, W]`` in ``[-1, 1]`` (C = 1 or 3), in a near-square grid."""
    from iif.plotting import plt

    n = x.shape[0]
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.2, rows * 1.2 + 0.3), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            img = ((x[i].float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
                      vmin=0, vmax=1)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def sc_loss(control_cost: Tensor, log_tilt: Tensor, name: str = "sc_loss") -> dict[str, float]:
    """The SC loss estimate ``E[sum_t ||Delta_t||^2/(2 c_t^2) - r/lambda]`` from per-path ``control_cost [B]`` and
    ``log_tilt [B]`` (``r/lambda``), and its standard error: ``{name: ..., name_se: ...}``."""
    sc = control_cost.cpu().double() - log_tilt.cpu().double()
    return {name: sc.mean().item(), f"{name}_se": (sc.std() / sc.numel() ** 0.5).item()}


class ImageEvaluator(Evaluator):
    """Samples the method with a fixed evaluation seed (the training RNG is untouched) and reports:

    * ``reward_mean``: ``E[r(x_0)]`` (the run's reward; on decoded pixels for a latent model);
    * ``sc_loss``, ``kl_path``: ``E[sum_t ||Delta_t||^2/(2 c_t^2) - r/lambda]`` and its path-KL part (paths only);
      ``sc_loss_se``: the standard error of the ``sc_loss`` estimate;
    * ``sample_nfe``: base evaluations per returned sample.

    Args:
        base: the run's base model (``decode`` for figures and returned samples).
        reward: the run's reward (evaluations here are not counted in the training budget).
        n_samples: samples drawn.
        seed: evaluation seed (plus 1000 x the run's seed).
        n_grid: images in the figure.
    """

    def __init__(self, base, reward, sampler=None, n_samples: int = 64, seed: int = 12345, n_grid: int = 16):
        if n_samples < 2 or n_grid < 1:
            raise ValueError(f"evaluation.n_samples must be >= 2 and n_grid >= 1, got {n_samples}, {n_grid}")
        self.base, self.reward = base, reward
        self.n_samples, self.seed, self.n_grid = n_samples, seed, n_grid

    def __call__(self, method, run_seed: int = 0, figures: bool = False, label: str = "samples") -> Evaluation:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + 1000 * run_seed)
            traj = method.sample(self.n_samples, cond=self.conditions(self.n_samples))
        log_tilt = self.reward.log_tilt(traj.x0, traj.cond).double().cpu()
        metrics = {"reward_mean": (log_tilt * self.reward.temperature).mean().item(), "sample_nfe": traj.nfe}
        if traj.control_cost is not None:
            metrics.update(sc_loss(traj.control_cost, log_tilt))
            metrics["kl_path"] = traj.control_cost.mean().item()
        with torch.no_grad():
            pixels = self.base.decode(traj.x0).cpu()
        figs = {"samples": image_grid(pixels[: self.n_grid], label)} if figures else {}
        return Evaluation(metrics, pixels, figs)

    def conditions(self, n: int) -> Tensor | None:
        """The conditions of the evaluated samples ``[n, ...]``; None: drawn by the method's condition source."""
        return None

    def figure(self, panels: dict[str, Tensor], n: int = 10):
        """One row per entry of ``panels`` (name: images ``[m, C, H, W]``), its first ``n`` images."""
        from iif.plotting import plt

        fig, axes = plt.subplots(len(panels), n, figsize=(n * 0.9, len(panels) * 0.95 + 0.2), squeeze=False)
        for row, (name, x) in zip(axes, panels.items()):
            for ax, img in zip(row, x[:n].float()):
                img = ((img.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
                ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
            for ax in row:
                ax.axis("off")
            row[0].text(-0.15, 0.5, name, transform=row[0].transAxes, ha="right", va="center", fontsize=8)
        fig.tight_layout()
        return fig
