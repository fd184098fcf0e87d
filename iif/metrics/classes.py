"""``classes``: the evaluator of class-conditional sampling with a classifier reward (IIF paper Table 1), with a
Monte-Carlo reference of the tilted target.

With ``r(x) = log p(S | x)`` (``S`` a class or a class set) and ``lambda = 1`` the tilted target
``p_tilt(x) ∝ p_base(x) p(S | x)`` is the base model's own posterior given ``S``. The reference estimates it by
self-normalised importance sampling from ``n_reference`` samples of the base model's own sampler
(``iif.metrics.snis``; weights ``exp(r / lambda)``): ``E_target[r]``, the class fractions (classifier argmax),
``log Z``, the effective sample size, and a reference image set drawn by resampling. It is computed once per base
model, reward and sampler (keyed by a hash of their weights and settings) and cached under ``cache_dir``; the base
samples behind it are cached apart, keyed without the reward's classes, so that every class set of one base model and
sampler (table1's single class and even digits) reweights the same samples instead of drawing its own.

Every evaluation reports, beside the paper's metrics (``reward_mean`` = E[r]; ``fid`` = Fréchet distance on the
classifier's penultimate-layer features against real test images of ``S``), the distances to the target:
``reward_gap = |E[r] - E_target[r]|``, ``ref_fid`` (Fréchet distance to the resampled reference set) and
``class_tv`` (total variation between the samples' and the target's class fractions).
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from iif.metrics.base import Evaluation
from iif.metrics.fid import FeatureFID
from iif.metrics.images import ImageEvaluator, image_grid
from iif.metrics.snis import snis_reference
from iif.utils import atomic_torch_save, atomic_write_text

log = logging.getLogger(__name__)
Tensor = torch.Tensor


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, dict):  # a state dict: its tensors' bytes
            for k in sorted(p):
                h.update(k.encode())
                v = p[k]
                # a tensor's bytes, whatever its dtype (numpy has no bfloat16)
                h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                         if torch.is_tensor(v) else repr(v).encode())
        else:
            h.update(repr(p).encode())
    return h.hexdigest()[:16]


class ClassTiltEvaluator(ImageEvaluator):
    """Class-tilt metrics and the SNIS reference (see the module docstring).

    Args:
        base, reward, sampler: the run's (the reward a :class:`~iif.rewards.classifier.ClassifierReward`; its
            classifier gives the labels and the FID features).
        data: the dataset (``iif.data.sets``) whose test images of the reward's classes are the FID reference.
        n_samples: samples per evaluation (FID on them).
        n_reference: base samples of the SNIS reference; n_resample: images of the resampled reference set.
        reference_seed: the reference's seed (independent of runs).
        batch_size: base samples per sampler call when drawing the reference.
        cache_dir: where the reference is cached.
        seed, n_grid: as :class:`~iif.metrics.images.ImageEvaluator`.
    """

    def __init__(self, base, reward, sampler=None, data=None, n_samples: int = 512, n_reference: int = 4096,
                 n_resample: int = 1024, reference_seed: int = 777, batch_size: int = 512,
                 cache_dir: str = "outputs/cache", seed: int = 12345, n_grid: int = 64):
        super().__init__(base, reward, sampler, n_samples=n_samples, seed=seed, n_grid=n_grid)
        if sampler is None or data is None:
            raise ValueError("evaluation=classes needs the run's sampler and a dataset (evaluation.data)")
        if not hasattr(reward, "net") or not hasattr(reward, "classes"):
            raise ValueError("evaluation=classes needs a classifier reward (reward=mnist_classifier)")
        if n_reference < 2 or n_resample < 2:
            raise ValueError(f"evaluation.n_reference and n_resample must be >= 2, got {n_reference}, {n_resample}")
        self.sampler, self.data = sampler, data
        self.n_reference, self.n_resample, self.reference_seed = int(n_reference), int(n_resample), reference_seed
        self.batch_size, self.cache_dir = int(batch_size), Path(cache_dir)
        self.reference: dict | None = None
        self._fid_real = self._fid_ref = self._real = None

    # ---- the reference
    def reference_path(self) -> Path:
        key = _digest(self.base.state_dict(), self.reward.net.state_dict(), self.reward.classes.tolist(),
                      self.reward.temperature, repr(self.base.schedule), vars(self.sampler), self.n_reference,
                      self.n_resample, self.reference_seed, self.batch_size)
        return self.cache_dir / f"reference-{key}"

    def base_samples_path(self) -> Path:
        """The cache entry of the reference's base samples: keyed by the base model, its sampler and the draw's
        sizes and seed, not by the reward (every class set reweights the same samples)."""
        key = _digest(self.base.state_dict(), repr(self.base.schedule), vars(self.sampler), self.n_reference,
                      self.reference_seed, self.batch_size)
        return self.cache_dir / f"base-samples-{key}" / "samples.pt"

    def base_samples(self) -> Tensor:
        """``n_reference`` samples ``x_0`` of the base model's own sampler ``[N, *sample_shape]`` (CPU, float32),
        drawn in batches of ``batch_size`` with the reference's seed, or loaded from :meth:`base_samples_path`."""
        path = self.base_samples_path()
        if path.exists():
            log.info("SNIS reference: base samples loaded from %s", path.parent)
            return torch.load(path, weights_only=True)
        log.info("SNIS reference: %d base samples (cached at %s)", self.n_reference, path.parent)
        xs = []
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(self.reference_seed)
            for i in range(0, self.n_reference, self.batch_size):
                xs.append(self.sampler.sample(self.base, None, min(self.batch_size, self.n_reference - i)).x0.cpu())
        samples = torch.cat(xs).contiguous()
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(samples, path)
        return samples

    def prepare(self) -> None:
        """Load the test images of the reward's classes (a missing dataset fails here, before any training), then
        load or compute the SNIS reference."""
        self._real = self.data.of_classes("test", self.reward.classes.tolist())
        folder = self.reference_path()
        if (folder / "reference.pt").exists():
            self.reference = torch.load(folder / "reference.pt", weights_only=True)
            log.info("SNIS reference loaded from %s", folder)
            return
        log.info("SNIS reference of classes %s (cached at %s)", self.reward.classes.tolist(), folder)
        gen = torch.Generator().manual_seed(self.reference_seed)
        samples = self.base_samples()
        xs, log_w, rewards, labels = [], [], [], []
        with torch.no_grad():
            for i in range(0, self.n_reference, self.batch_size):  # the batches in which they were drawn
                x = samples[i:i + self.batch_size].to(self.base.device)
                pixels = self.base.decode(x).cpu()
                lt = self.reward.log_tilt(x).double().cpu()
                xs.append(pixels)
                log_w.append(lt)
                rewards.append(lt * self.reward.temperature)
                labels.append(self.predict(pixels))
        x, labels = torch.cat(xs), torch.cat(labels)
        ref = snis_reference(torch.cat(log_w), torch.cat(rewards), labels, n_classes=self.n_classes(),
                             n_resample=self.n_resample, generator=gen)
        base_fractions = torch.bincount(labels, minlength=self.n_classes()).double() / labels.numel()
        summary = {"target_reward_mean": ref.reward_mean, "target_reward_mean_se": ref.reward_mean_se,
                   "ref_log_z": ref.log_z, "ref_ess": ref.ess, "ref_ess_frac": ref.ess_frac, "n_reference": ref.n,
                   "base_reward_mean": float(torch.cat(rewards).mean()),
                   "target_class_fractions": ref.class_fractions.tolist(),
                   "base_class_fractions": base_fractions.tolist(), "classes": self.reward.classes.tolist()}
        self.reference = {"summary": summary, "images": x[ref.resampled].contiguous(),
                          "class_fractions": ref.class_fractions}
        folder.mkdir(parents=True, exist_ok=True)
        fig = image_grid(self.reference["images"][: self.n_grid], "SNIS reference (resampled base samples)")
        fig.savefig(folder / "reference.png", dpi=110)
        import matplotlib.pyplot as plt

        plt.close(fig)
        atomic_write_text(folder / "reference.json", json.dumps(summary, indent=1))
        atomic_torch_save(self.reference, folder / "reference.pt")
        log.info("SNIS reference: %s", {k: v for k, v in summary.items() if not isinstance(v, list)})

    # ---- helpers
    def n_classes(self) -> int:
        return self.reward.net.head.out_features

    @torch.no_grad()
    def predict(self, pixels: Tensor) -> Tensor:
        """The classifier's labels ``[n]`` of images ``[n, C, H, W]``."""
        net = self.reward.net
        dev = next(net.parameters()).device
        return torch.cat([net(pixels[i:i + 1024].to(dev)).argmax(-1).cpu() for i in range(0, len(pixels), 1024)])

    def features(self, x: Tensor) -> Tensor:
        net = self.reward.net
        with torch.no_grad():
            return net.features(x.to(next(net.parameters()).device).float())

    # ---- evaluation
    def __call__(self, method, run_seed: int = 0, figures: bool = False, label: str = "samples") -> Evaluation:
        if self.reference is None:
            self.prepare()
        result = super().__call__(method, run_seed, figures, label)
        pixels = result.samples
        if self._fid_real is None:
            self._fid_real = FeatureFID(self.features, self._real)
            self._fid_ref = FeatureFID(self.features, self.reference["images"])
        summary = self.reference["summary"]
        labels = self.predict(pixels)
        fractions = torch.bincount(labels, minlength=self.n_classes()).double() / labels.numel()
        result.metrics.update({
            "fid": self._fid_real(pixels),
            "ref_fid": self._fid_ref(pixels),
            "reward_gap": abs(result.metrics["reward_mean"] - summary["target_reward_mean"]),
            "class_tv": 0.5 * (fractions - self.reference["class_fractions"]).abs().sum().item(),
            "target_reward_mean": summary["target_reward_mean"],
            "ref_ess": summary["ref_ess"],
            "ref_log_z": summary["ref_log_z"],
        })
        return result
