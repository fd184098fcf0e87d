"""The pretraining stage: the networks a fine-tuning run takes as given (an image diffusion model, the classifier of
a reward), trained by the suite on a dataset and cached by a hash of everything that determines them.

A cache entry is a folder ``<cache_dir>/<name>-<hash>/`` holding ``weights.pt`` (a ``state_dict``), ``meta.json``
(the configuration, the seed, the final loss, the test accuracy of a classifier, the wall time), ``loss.png`` (the
loss curve) and, for a diffusion model, ``samples.png`` (a grid of its samples). ``weights.pt`` is written last and
atomically, so an interrupted pretraining leaves no entry that looks complete; a second run with the same
configuration loads it. ``cache_dir`` is the run's ``cache_dir`` (``IIF_CACHE`` moves it).

Weights the suite made at CI scale ship with the package (``iif/weights/<name>-<hash>/``: ``weights.pt`` and a
``meta.json`` with the command and seed that made them, ``scripts/ship_weights.py``): an entry missing from the cache
but shipped is loaded from there (``shipped: false`` trains it instead). Their names are the same hash, so any change
of configuration, architecture or training code misses them and pretrains.

Pretraining draws from its own seeded generator (the weights depend on ``seed`` only, not on the run's random
state) and, with ``bf16``, runs the forward pass under bfloat16 autocast (the weights stay float32).

    iif-train experiment=mnist_class ...   # pretrains base and classifier on first use (progress bars on a terminal)
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import trange

from iif.utils import atomic_torch_save, atomic_write_text, progress_enabled

log = logging.getLogger(__name__)
Tensor = torch.Tensor
VERSION = 1  # bump when the training code changes what a configuration produces
SHIPPED = Path(__file__).resolve().parent / "weights"  # pretrained entries that ship with the package


class Pretraining:
    """Cached minibatch training of one network on a dataset (subclasses: the loss and the report).

    Args:
        data: the dataset (``iif.data.sets``): ``train()``/``test()`` return ``(images [N, C, H, W] in [-1, 1],
            labels [N])`` and ``key()`` what identifies it.
        steps, batch_size, lr: Adam with a cosine decay of the learning rate to 0 over ``steps``.
        seed: initialisation and data order.
        bf16: forward passes under bfloat16 autocast (CPU and CUDA).
        cache_dir: the cache's folder.
        checkpoint_every: steps between the training-state checkpoints of :meth:`fit` (``partial.pt`` in the entry's
            folder, removed once the weights are written); not part of the key (resuming changes no weight).
        shipped: load an entry that ships with the package (``SHIPPED``) when the cache has none; not part of the
            key (the shipped weights are the ones this configuration trains).
    """

    name = "net"

    def __init__(self, data, steps: int = 2000, batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
                 bf16: bool = False, cache_dir: str = "outputs/cache", shipped: bool = True,
                 checkpoint_every: int = 1000):
        if steps < 1 or batch_size < 1 or not lr > 0 or checkpoint_every < 1:
            raise ValueError(f"pretraining needs steps >= 1, batch_size >= 1, lr > 0 and checkpoint_every >= 1, got "
                             f"{steps}, {batch_size}, {lr}, {checkpoint_every}")
        self.data, self.steps, self.batch_size, self.lr = data, int(steps), int(batch_size), float(lr)
        self.seed, self.bf16, self.cache_dir, self.shipped = int(seed), bool(bf16), Path(cache_dir), bool(shipped)
        self.checkpoint_every = int(checkpoint_every)

    # ---- the cache
    def key(self, net: nn.Module, extra: dict | None = None) -> dict:
        """Everything that determines the trained weights: the architecture, the data, the training settings."""
        return {"kind": type(self).__name__, "net": str(net), "data": self.data.key(), "version": VERSION,
                "train": {"steps": self.steps, "batch_size": self.batch_size, "lr": self.lr, "seed": self.seed,
                          "bf16": self.bf16}, **(extra or {})}

    def entry(self, net: nn.Module, extra: dict | None = None) -> Path:
        digest = hashlib.sha256(json.dumps(self.key(net, extra), sort_keys=True).encode()).hexdigest()[:16]
        return self.cache_dir / f"{self.name}-{digest}"

    def weights_path(self, net: nn.Module, extra: dict | None = None) -> Path:
        """The weights file of this configuration: the cache's, else the shipped one (if ``shipped``), else the
        cache's that pretraining will write."""
        folder = self.entry(net, extra)
        shipped = SHIPPED / folder.name / "weights.pt"
        if self.shipped and not (folder / "weights.pt").exists() and shipped.exists():
            return shipped
        return folder / "weights.pt"

    def load_or_train(self, net: nn.Module, extra: dict | None = None, **context) -> Path:
        """Load ``net``'s weights from the cache (or the shipped entries), or train it and fill the cache; returns the
        folder the weights are in.
        ``context``: what the loss needs besides the network (e.g. the diffusion path)."""
        folder = self.entry(net, extra)
        weights = self.weights_path(net, extra)
        if weights.exists():
            net.load_state_dict(torch.load(weights, weights_only=True, map_location="cpu"))
            log.info("%s loaded from %s", self.name, weights.parent)
            return weights.parent
        log.info("pretraining %s (%d steps, batch %d); cached at %s", self.name, self.steps, self.batch_size, folder)
        t0 = time.perf_counter()
        losses, resumed_at = self.fit(net, folder, **context)
        report = {"key": self.key(net, extra), "final_loss": float(sum(losses[-50:]) / len(losses[-50:])),
                  "params": sum(p.numel() for p in net.parameters()), **self.report(net, folder, **context)}
        report["wall_s"] = time.perf_counter() - t0  # of this process: from the resumed step, if it resumed
        if resumed_at:
            report["resumed_at_step"] = resumed_at
        folder.mkdir(parents=True, exist_ok=True)
        _loss_figure(losses, f"{self.name}: training loss").savefig(folder / "loss.png", dpi=110)
        atomic_write_text(folder / "meta.json", json.dumps(report, indent=1))
        atomic_torch_save({k: v.detach().cpu() for k, v in net.state_dict().items()}, weights)  # last: complete
        (folder / "partial.pt").unlink(missing_ok=True)
        log.info("%s pretrained in %.0f s: %s", self.name, report["wall_s"],
                 {k: v for k, v in report.items() if k not in ("key",)})
        return folder

    # ---- training
    def fit(self, net: nn.Module, folder: Path | None = None, **context) -> tuple[list[float], int]:
        """``steps`` Adam steps on :meth:`loss`; returns the loss of every step and the step it resumed at (0: from
        scratch).

        With ``folder``, every ``checkpoint_every`` steps the whole training state (weights, Adam, the learning-rate
        schedule, the data generator, the losses so far) is written atomically to ``folder/partial.pt``, and a
        ``partial.pt`` found there is resumed from: an interrupted pretraining (a preempted job, a time limit) loses
        at most ``checkpoint_every`` steps and ends with the weights of an uninterrupted one. Every ``checkpoint_every``
        steps the pace is logged too (a job without a terminal has no progress bar). The losses stay on the
        device (one read every 50 steps for the progress bar), so a GPU is not made to wait for the host each
        step."""
        images, labels = self.data.train()
        gen = torch.Generator().manual_seed(self.seed)
        device = next(net.parameters()).device
        net.requires_grad_(True).train()
        opt = torch.optim.Adam(net.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, self.steps)
        losses = torch.zeros(self.steps, device=device)
        partial = None if folder is None else Path(folder) / "partial.pt"
        start = 0
        if partial is not None and partial.exists():
            state = torch.load(partial, weights_only=True, map_location=device)
            net.load_state_dict(state["net"])
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
            gen.set_state(state["gen"].cpu())
            start = int(state["step"])
            losses[:start] = state["losses"]
            log.info("%s: resuming its pretraining at step %d of %d from %s", self.name, start, self.steps, partial)
        t0 = time.perf_counter()
        bar = trange(start, self.steps, desc=f"pretrain {self.name}", disable=not progress_enabled())
        for step in bar:
            idx = torch.randint(0, images.shape[0], (self.batch_size,), generator=gen)
            x, y = images[idx].to(device), labels[idx].to(device)
            with self.autocast(device):
                loss = self.loss(net, x, y, gen, **context)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses[step] = loss.detach()
            if (step + 1) % 50 == 0:
                bar.set_postfix(loss=f"{losses[step - 49:step + 1].mean().item():.4f}")
            if (step + 1) % self.checkpoint_every == 0 and step + 1 < self.steps:
                if partial is not None:
                    atomic_torch_save({"net": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                                       "gen": gen.get_state(), "step": step + 1, "losses": losses[:step + 1]}, partial)
                pace = (time.perf_counter() - t0) / (step + 1 - start)
                log.info("pretrain %s: step %d/%d, loss %.4f, %.1f ms a step, %.0f s to go", self.name, step + 1,
                         self.steps, losses[step + 1 - self.checkpoint_every:step + 1].mean().item(), 1e3 * pace,
                         pace * (self.steps - step - 1))
        net.requires_grad_(False).eval()
        return losses.tolist(), start

    def autocast(self, device: torch.device):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16)

    def loss(self, net: nn.Module, x: Tensor, y: Tensor, gen: torch.Generator, **context) -> Tensor:
        raise NotImplementedError

    def report(self, net: nn.Module, folder: Path, **context) -> dict:
        """Measurements of the trained network written to ``meta.json`` (and figures into ``folder``)."""
        return {}


class DenoiserPretraining(Pretraining):
    """A diffusion model by denoising score matching in the epsilon form (docs/methods.md §1.1):
    ``L = E_{t ~ U(t_min, 1), x_0 ~ data, eps} ||eps_theta(alpha(t) x_0 + sigma(t) eps, t) - eps||^2``.

    ``context``: ``base``, the :class:`~iif.base_models.base.BaseModel` whose network is trained (its schedule and its
    conversion of the prediction to ``eps``). The report is a grid of DDPM samples.

    Args:
        t_min: smallest training time.
        report_steps: DDPM steps of the 64 samples in ``samples.png``.
        (the rest: :class:`Pretraining`)
    """

    name = "denoiser"

    def __init__(self, data, t_min: float = 1e-3, report_steps: int = 100, **kwargs):
        super().__init__(data, **kwargs)
        self.t_min, self.report_steps = float(t_min), int(report_steps)

    def key(self, net, extra=None):
        return {**super().key(net, extra), "t_min": self.t_min}

    def loss(self, net, x, y, gen, *, base) -> Tensor:
        t = (self.t_min + (1 - self.t_min) * torch.rand(x.shape[0], generator=gen)).to(x.device)
        eps = torch.randn(x.shape, generator=gen).to(x.device)
        a, s = base._coefficients(t, x)
        xt = a * x + s * eps
        pred = base.to_eps(base.predict(xt, t), xt, t)
        return F.mse_loss(pred.float(), eps)

    def report(self, net, folder, *, base) -> dict:
        from iif.metrics.images import image_grid
        from iif.samplers.ddpm import DDPMSampler

        sampler = DDPMSampler(n_steps=self.report_steps)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(self.seed)
            x = sampler.sample(base, None, 64).x0.cpu()
        folder.mkdir(parents=True, exist_ok=True)
        fig = image_grid(x, f"{self.name}: samples")
        fig.savefig(folder / "samples.png", dpi=110)
        import matplotlib.pyplot as plt

        plt.close(fig)
        return {}


class ClassifierPretraining(Pretraining):
    """A classifier by cross-entropy on labelled images; the report is its test accuracy (``test_acc``), which
    ``min_test_acc`` must reach (else the run stops: a reward from a poor classifier would mislead every number).

    Args:
        min_test_acc: the accuracy the trained classifier must reach on the test split.
        (the rest: :class:`Pretraining`)
    """

    name = "classifier"

    def __init__(self, data, min_test_acc: float = 0.0, **kwargs):
        super().__init__(data, **kwargs)
        self.min_test_acc = float(min_test_acc)

    def loss(self, net, x, y, gen) -> Tensor:
        return F.cross_entropy(net(x).float(), y)

    def report(self, net, folder) -> dict:
        from iif.utils import RunError

        acc = accuracy(net, *self.data.test())
        if acc < self.min_test_acc:
            raise RunError(f"the pretrained classifier reaches {acc:.4f} test accuracy, below min_test_acc = "
                           f"{self.min_test_acc} (train longer: reward.pretrain.steps)")
        return {"test_acc": acc}


@torch.no_grad()
def accuracy(net: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 1024) -> float:
    """Fraction of ``images [N, C, H, W]`` whose argmax logit is ``labels [N]``."""
    device = next(net.parameters()).device
    correct = 0
    for i in range(0, images.shape[0], batch_size):
        logits = net(images[i:i + batch_size].to(device))
        correct += (logits.argmax(-1).cpu() == labels[i:i + batch_size]).sum().item()
    return correct / images.shape[0]


def _loss_figure(losses: list[float], title: str):
    from iif.plotting import plt

    fig, ax = plt.subplots(figsize=(5, 3))
    window = max(1, len(losses) // 100)
    smooth = [sum(losses[i:i + window]) / window for i in range(0, len(losses) - window + 1, window)]
    ax.plot(range(window, window * len(smooth) + 1, window), smooth)
    ax.set_yscale("log" if min(smooth) > 0 and max(smooth) / min(smooth) > 10 else "linear")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    fig.tight_layout()
    return fig
