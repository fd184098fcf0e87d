"""The composed config of a run (``conf/``) and what it says about the run: its name, tags and derived sizes."""
from __future__ import annotations

import threading
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from iif import distributed

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
_COMPOSING = threading.Lock()
# run and sweep directories are named by the start time; in a run of several processes rank 0's (iif.distributed)
OmegaConf.register_new_resolver("iif.now", lambda pattern: distributed.start_time().strftime(pattern),
                                use_cache=True, replace=True)


def compose(overrides: list[str] = ()) -> tuple[DictConfig, dict[str, str]]:
    """Compose the config as ``iif-train`` would (for scripts and tests): returns (config, chosen options). Safe in
    threads (``iif-reproduce``'s pool): Hydra's state is one per process, so one composition at a time."""
    with _COMPOSING, hydra.initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra.compose("config", overrides=list(overrides), return_hydra_config=True)
    choices = dict(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, choices


def run_name(cfg: DictConfig, choices: dict[str, str]) -> str:
    """``<experiment>-<method>-<base_model>-s<seed>``: the experiment log's name of the run."""
    method = choices.get("method", cfg.method._target_)
    return f"{choices.get('experiment', 'run')}-{method}-{choices.get('base_model', '')}-s{cfg.seed}"


def run_tags(cfg: DictConfig, choices: dict[str, str]) -> list[str]:
    """Tags for the experiment logger: the chosen options that tell runs of one experiment apart, the seed, and in
    a multirun the sweep (its directory's name), so the runs of one sweep can be filtered out of the group."""
    tags = [f"{g}={choices[g]}" for g in ("method", "base_model", "reward", "sampler") if choices.get(g)]
    tags.append(f"seed={cfg.seed}")
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        tags.append(f"sweep={Path(HydraConfig.get().sweep.dir).name}")
    return tags


def derived_sizes(cfg: DictConfig, ranks: distributed.World = distributed.World()) -> str:
    """The sizes a user wants to see (nanoGPT style); in a run of several processes, each one's share."""
    m = cfg.method
    per = {k: f" ({m[k] // ranks.size} per process)" for k in ("n_samples", "batch_size") if k in m and ranks.size > 1}
    sizes = [f"{k} {m[k]}{per.get(k, '')}" for k in ("n_samples", "batch_size", "grad_steps", "k") if k in m]
    if "acceptance" in m:
        sizes.append(f"acceptance {list(m.acceptance['values'])}")
    procs = f"{ranks.size} processes; " if ranks.size > 1 else ""
    return procs + f"{cfg.sampler.n_steps} sampling steps; " + (", ".join(sizes) if sizes else "no training")
