"""``posterior``: the evaluator of an inverse problem (IIF paper Figure 2, super-resolution): posterior samples for one
fixed test measurement ``y = A x_gt + sigma_y xi`` of a held-out image ``x_gt``, with the stochastic-control loss
of the amortised ``h(., ., y)`` at that ``y`` (the quantity the paper's descent theorem says falls every iteration).

Metrics (besides ``reward_mean``, ``sc_loss``, ``sc_loss_se``, ``kl_path`` of the image evaluator, at ``y``):

* ``consistency``: ``E ||A x - y||^2 / (d_y sigma_y^2)``: about 1 (at most) for posterior samples when the prior is
  flat at the scale of ``sigma_y`` (then ``A x ~ N(y, sigma_y^2 I)``), far above 1 for samples that ignore ``y``;
* ``psnr_mean``: the PSNR (peak 2 on ``[-1, 1]``) of the posterior mean against ``x_gt``;
* ``posterior_std``: the mean pixel standard deviation of the samples (diversity);
* ``sc_loss_amortised`` (with ``n_measurements > 0``; and ``sc_loss_amortised_se``): the SC loss averaged over
  ``n_measurements`` measurements of other test images, ``n_samples / n_measurements`` paths each. An amortised
  ``h(., ., y)`` is trained over simulated measurements, so this average, not the loss at one ``y``, is the objective
  whose descent the paper's argument concerns; the measurements are fixed (seeded), so that curves compare.
"""
from __future__ import annotations

import math

import torch

from iif.metrics.base import Evaluation
from iif.metrics.images import ImageEvaluator, sc_loss

Tensor = torch.Tensor


class PosteriorEvaluator(ImageEvaluator):
    """Posterior sampling at one measurement of a test image.

    Args:
        base, reward, sampler: the run's; the reward has ``operator`` (``A``) and ``sigma_y``
            (:class:`~iif.rewards.superres.SuperResolutionReward`).
        data: the dataset (``iif.data.sets``) whose test split holds ``x_gt``.
        index: ``x_gt``'s index in the test split (the authors' Flowers scripts: 3).
        measurement_seed: the seed of ``xi`` (the authors': 123).
        n_measurements: test measurements of ``sc_loss_amortised`` (0: not computed); divides ``n_samples``.
        n_samples, seed, n_grid: as :class:`~iif.metrics.images.ImageEvaluator`.
    """

    def __init__(self, base, reward, sampler=None, data=None, index: int = 3, measurement_seed: int = 123,
                 n_samples: int = 256, seed: int = 12345, n_grid: int = 16, n_measurements: int = 0):
        super().__init__(base, reward, sampler, n_samples=n_samples, seed=seed, n_grid=n_grid)
        if data is None or not hasattr(reward, "operator"):
            raise ValueError("evaluation=posterior needs a dataset (evaluation.data) and a measurement reward "
                             "(reward=superres)")
        if n_measurements < 0 or (n_measurements and n_samples % n_measurements):
            raise ValueError(f"evaluation.n_measurements must be 0 or divide evaluation.n_samples = {n_samples}, got "
                             f"{n_measurements}")
        self.data, self.index, self.measurement_seed = data, int(index), int(measurement_seed)
        self.n_measurements = int(n_measurements)
        self.x_gt = self.y = self.ys = None

    def prepare(self) -> None:
        images, _ = self.data.test()
        if not 0 <= self.index < images.shape[0]:
            raise ValueError(f"evaluation.index {self.index} is outside the test split ({images.shape[0]} images)")
        self.x_gt = images[self.index: self.index + 1]
        gen = torch.Generator().manual_seed(self.measurement_seed)
        ay = self.reward.operator(self.x_gt)
        self.y = ay + self.reward.sigma_y * torch.randn(ay.shape, generator=gen)
        if self.n_measurements:
            if self.n_measurements > images.shape[0]:
                raise ValueError(f"evaluation.n_measurements = {self.n_measurements} exceeds the test split "
                                 f"({images.shape[0]} images)")
            pick = torch.randperm(images.shape[0], generator=gen)[:self.n_measurements]
            ay = self.reward.operator(images[pick])
            self.ys = ay + self.reward.sigma_y * torch.randn(ay.shape, generator=gen)  # [m, *y_shape]

    def conditions(self, n: int) -> Tensor:
        if self.y is None:
            self.prepare()
        return self.y.expand(n, *self.y.shape[1:]).to(self.base.device)

    def __call__(self, method, run_seed: int = 0, figures: bool = False, label: str = "samples") -> Evaluation:
        result = super().__call__(method, run_seed, False, label)
        x = result.samples.double()
        res = self.reward.operator(x) - self.y.double()
        mse = (x.mean(0, keepdim=True) - self.x_gt.double()).square().mean().item()
        result.metrics.update({
            "consistency": (res.square().flatten(1).sum(1) / (res[0].numel() * self.reward.sigma_y ** 2)).mean().item(),
            "psnr_mean": 10 * math.log10(4.0 / max(mse, 1e-12)),
            "posterior_std": x.std(0).mean().item(),
        })
        if self.n_measurements:
            result.metrics.update(self.amortised_sc_loss(method, run_seed))
        if figures:
            result.figures = {"samples": self.figure({label: result.samples})}
        return result

    def amortised_sc_loss(self, method, run_seed: int = 0) -> dict[str, float]:
        """``sc_loss_amortised``: ``mean_i E[sum_t ||Delta_t||^2/(2 c_t^2) - r(x_0 | y_i)/lambda]`` over the
        ``n_measurements`` measurements ``y_i`` (``n_samples / n_measurements`` paths each), and its standard error
        over the paths; empty for a method without path statistics."""
        if self.ys is None:
            self.prepare()
        cond = self.ys.repeat_interleave(self.n_samples // self.n_measurements, 0).to(self.base.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + 1000 * run_seed + 1)
            traj = method.sample(self.n_samples, cond=cond)
        if traj.control_cost is None:
            return {}
        return sc_loss(traj.control_cost, self.reward.log_tilt(traj.x0, traj.cond), "sc_loss_amortised")

    def figure(self, panels: dict[str, Tensor], n: int = 8):
        """One row per entry of ``panels`` (name: samples ``[m, C, H, W]``): the measurement (upsampled), the ground
        truth, the posterior mean, then ``n`` samples."""
        from iif.plotting import plt

        if self.y is None:
            self.prepare()
        y_up = self.reward.adjoint(self.y) * self.reward.factor ** 2 if hasattr(self.reward, "adjoint") else self.y
        cols = 3 + n
        fig, axes = plt.subplots(len(panels), cols, figsize=(cols * 1.0, len(panels) * 1.1 + 0.3), squeeze=False)
        for row, (name, x) in zip(axes, panels.items()):
            images = [y_up[0], self.x_gt[0], x.float().mean(0), *x[:n].float()]
            titles = ["y", "x_gt", "mean", *[""] * n]
            for ax, img, title in zip(row, images, titles):
                ax.axis("off")
                img = ((img.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
                ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
                ax.set_title(title, fontsize=7)
            row[0].text(-0.3, 0.5, name, transform=row[0].transAxes, ha="right", va="center", fontsize=8)
        fig.tight_layout()
        return fig
