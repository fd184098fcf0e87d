"""``iif-prepare``: what a run takes as given, made once and cached, in a job of the run's own launcher.

A run of an image experiment first loads or makes its shared parts: the pretrained base model, the reward's
classifier, the evaluation's Monte-Carlo reference of the tilted target (``Components.prepare``; each cached by a
hash of its configuration). ``iif-reproduce`` does this once before the runs, so that parallel runs do not each
pretrain. With a cluster launcher (``launcher=slurm``) that once must happen on a compute node, with the runs'
``device`` and ``resources``, not on the login node that submits: at paper scale it is a GPU's work (20,000 UNet
steps, 50,000 reference samples), and a login node may have no GPU at all. So ``iif-reproduce`` submits it through
this entry point as a one-job multirun of the same config (Hydra's launcher: the site file, the resources, the
requeue on preemption; pretraining itself resumes from ``partial.pt``), waits for it, then submits the runs.

    iif-prepare experiment=mnist_class reward.classes=[3] device=cuda            # here
    iif-prepare -m launcher=slurm resources=gpu24 experiment=mnist_class device=cuda   # as a Slurm job

The job writes ``prepared.json`` in its output directory: the device, the wall time and the cache entries it
loaded or made. Errors: one ``iif-prepare: error:`` line (exit status 2 for a bad config, 1 for a failed step).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from iif import device as devices
from iif.build import build
from iif.config import CONF_DIR
from iif.utils import ConfigError, RunError, atomic_write_text

log = logging.getLogger(__name__)


def prepare(cfg: DictConfig, out_dir: str | Path) -> dict:
    """Build the run's components on its device and prepare them (cached pretraining, data, reference); returns
    (and writes to ``out_dir/prepared.json``) the device, the wall time and the cache entries."""
    device = devices.resolve(cfg.get("device", "cpu"))
    if cfg.get("torch_threads"):
        torch.set_num_threads(cfg.torch_threads)
    comp = build(cfg, device)
    t0 = time.perf_counter()
    comp.prepare()
    parts = (comp.base, getattr(comp.reward, "inner", comp.reward))  # a latent model's reward wraps a pixel reward
    paths = [getattr(part, "cache_path", lambda: None)() for part in parts]
    entries = [str(Path(path).parent) for path in paths if path is not None]
    reference = getattr(comp.evaluator, "reference_path", lambda: None)()
    report = {"device": devices.describe(device), "wall_s": time.perf_counter() - t0,
              "cache": entries + ([str(reference)] if reference else [])}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(out_dir) / "prepared.json", json.dumps(report, indent=1))
    log.info("prepared in %.0f s on %s: %s", report["wall_s"], report["device"], report["cache"])
    return report


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        prepare(cfg, out_dir)
    except (ConfigError, RunError) as e:
        if os.environ.get("SUBMITIT_EXECUTOR"):  # a job's result is its exception (as in iif.train)
            raise
        shutil.rmtree(out_dir / ".hydra", ignore_errors=True)  # Hydra's record of a start that did nothing
        (out_dir / "prepare.log").unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            out_dir.rmdir()  # only if empty
        print(f"iif-prepare: error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, ConfigError) else 1)


def main() -> None:
    """``iif-prepare`` (Hydra's command line: overrides, ``-m`` with a launcher)."""
    _hydra_main()


if __name__ == "__main__":
    main()
