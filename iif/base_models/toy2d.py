"""``toy2d``: an MLP noise-prediction network on a Gaussian path (the VP-SDE in the toy), pretrained by the suite on prior samples.

Pretraining minimises the denoising loss ``E_{t, x_0 ~ p_data, eps} ||eps - eps_theta(m x_0 + v eps, t)||^2``
(docs/methods.md §1.1, epsilon weighting). The weights are cached under ``cache_dir`` keyed by a hash of everything
that determines them, so pretraining runs once per configuration; a cache file is written atomically.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from tqdm.auto import trange

from iif.base_models.base import BaseModel
from iif.gmm import GMM
from iif.nn import TimeMLP
from iif.schedules.base import GaussianPath
from iif.utils import atomic_torch_save, progress_enabled

log = logging.getLogger(__name__)
Tensor = torch.Tensor


class Toy2DScoreMLP(BaseModel):
    """MLP ``eps_theta(x, t)`` pretrained on samples of ``prior``.

    Args:
        prior: the data mixture to pretrain on.
        schedule: the Gaussian path (``base_model.schedule``).
        hidden, layers, t_dim: network size.
        train_steps, batch_size, lr: pretraining (Adam, cosine decay to 0).
        t_min: smallest training time.
        seed: pretraining seed (independent of the run's seed: all runs share one base model).
        cache_dir: where pretrained weights are kept.
    """

    def __init__(self, prior: GMM, schedule: GaussianPath, hidden: int = 256, layers: int = 4, t_dim: int = 32,
                 train_steps: int = 6000, batch_size: int = 1024, lr: float = 2e-3, t_min: float = 1e-3,
                 seed: int = 0, cache_dir: str = "outputs/cache"):
        super().__init__(schedule, (prior.dim,))
        if train_steps < 1 or batch_size < 1 or lr <= 0:
            raise ValueError("toy2d pretraining needs train_steps >= 1, batch_size >= 1 and lr > 0")
        self.prior = prior
        with torch.random.fork_rng():  # the initialisation depends on `seed` only, not on the run's RNG
            torch.manual_seed(seed)
            self.net = TimeMLP(prior.dim, prior.dim, hidden=hidden, layers=layers, t_dim=t_dim)
        self.train_cfg = dict(train_steps=train_steps, batch_size=batch_size, lr=lr, t_min=t_min, seed=seed)
        self.cache_dir = Path(cache_dir)
        self.requires_grad_(False)

    def cache_path(self) -> Path:
        key = json.dumps({
            "prior": [self.prior.weights.tolist(), self.prior.means.tolist(), self.prior.covs.tolist()],
            "schedule": ([self.schedule.beta_min, self.schedule.beta_max] if hasattr(self.schedule, "beta_min")
                     else repr(self.schedule)),
            "net": [str(self.net)], "train": self.train_cfg, "version": 1,
        }, sort_keys=True)
        return self.cache_dir / f"toy2d-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"

    def prepare(self) -> None:
        path = self.cache_path()
        if path.exists():
            self.net.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))
            log.info("toy2d base model loaded from %s", path)
            return
        log.info("pretraining the toy2d base model (%d steps); cached at %s", self.train_cfg["train_steps"], path)
        self.pretrain()
        atomic_torch_save({k: v.cpu() for k, v in self.net.state_dict().items()}, path)

    def pretrain(self) -> None:
        cfg = self.train_cfg
        gen = torch.Generator().manual_seed(cfg["seed"])
        net = self.net.requires_grad_(True)
        opt = torch.optim.Adam(net.parameters(), lr=cfg["lr"])
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg["train_steps"])
        for _ in trange(cfg["train_steps"], desc="pretrain toy2d", disable=not progress_enabled()):
            x0 = self.prior.sample(cfg["batch_size"], generator=gen).float()
            t = cfg["t_min"] + (1 - cfg["t_min"]) * torch.rand(cfg["batch_size"], generator=gen)
            eps = torch.randn(x0.shape, generator=gen)
            # drawn on the CPU (the same weights on any device), trained where the network is
            x0, t, eps = x0.to(self.device), t.to(self.device), eps.to(self.device)
            t64 = t.double()
            xt = self.schedule.alpha(t64).float()[:, None] * x0 + self.schedule.sigma(t64).float()[:, None] * eps
            loss = ((net(xt, t) - eps) ** 2).sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        net.requires_grad_(False)

    def predict(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        return self.net(x, t)
