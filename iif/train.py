"""``iif-train``: one fine-tuning run, configured by Hydra (``conf/``).

Reads top to bottom: compose → validate → seed → build → resume if a checkpoint exists → loop (method step, log,
evaluate, checkpoint) → final evaluation → figure, ``metrics.json``.

    iif-train experiment=toy2d method=iif
    iif-train -m experiment=toy2d method=iif,reward_only seed=0,1,2
"""
from __future__ import annotations

import json
import logging
import os
import re
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from tqdm.auto import trange

from iif import device as devices
from iif import distributed
from iif.budget import Budget
from iif.loggers.null import NullLogger
from iif.plotting import plt, toy_figure
from iif.utils import ConfigError, RunError, atomic_torch_save, atomic_write_text, progress_enabled

log = logging.getLogger("iif.train")

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = "iif-checkpoint-v1"
# which config group provides each capability a component may require
PROVIDERS = {"differentiable_reward": "reward", "per_step_kernels": "sampler", "differentiable_base": "base_model"}


CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
# run and sweep directories are named by the start time; in a run of several processes rank 0's (iif.distributed)
OmegaConf.register_new_resolver("iif.now", lambda pattern: distributed.start_time().strftime(pattern),
                                use_cache=True, replace=True)


# ---------------------------------------------------------------------------------------------- start-up
def compose(overrides: list[str] = ()) -> tuple[DictConfig, dict[str, str]]:
    """Compose the config as ``iif-train`` would (for scripts and tests): returns (config, chosen options)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("config", overrides=list(overrides), return_hydra_config=True)
    choices = dict(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    apply_debug_overrides(cfg, overrides)
    return cfg, choices


def apply_debug_overrides(cfg: DictConfig, cli_overrides: list[str] = ()) -> None:
    """``debug=fast`` lists dotted keys; each is applied where the composed config has it and the command line
    did not set it (the user's overrides win)."""
    user_keys = {o.split("=", 1)[0].lstrip("+~") for o in cli_overrides}
    for key, value in ((cfg.get("debug") or {}).get("overrides") or {}).items():
        if key not in user_keys and OmegaConf.select(cfg, key, default="__missing__") != "__missing__":
            OmegaConf.update(cfg, key, value, merge=False)


def check_pairing(cfg: DictConfig, choices: dict[str, str]) -> None:
    """Fail before any compute if a component needs a capability another component does not provide."""
    reward_cls, base_cls = get_class(cfg.reward._target_), get_class(cfg.base_model._target_)
    sampler = instantiate(cfg.sampler)  # cheap; what it provides may depend on its settings (DDIM's eta)
    provided = (set(base_cls.provides) | set(sampler.provides)
                | ({"differentiable_reward"} if reward_cls.differentiable else set()))
    method_cls = get_class(cfg.method._target_)
    needers = [("method", method_cls.requires)]
    if method_cls.uses_guidance:
        needers.append(("guidance", get_class(cfg.guidance._target_).requires))
    for group, needs in needers:
        for need in sorted(set(needs) - provided):
            provider = PROVIDERS.get(need, "?")
            raise ConfigError(
                f"{group} '{choices.get(group, '?')}' needs {need.replace('_', ' ')}, which {provider} "
                f"'{choices.get(provider, '?')}' does not provide; choose another {provider} or {group}")


def check_world(cfg: DictConfig, choices: dict[str, str], ranks: distributed.World) -> None:
    """A run of several processes needs a method that splits its work across them."""
    if ranks.size > 1 and not get_class(cfg.method._target_).data_parallel:
        raise ConfigError(f"method '{choices.get('method', '?')}' runs in one process, and this run has "
                          f"{ranks.size} (torchrun --nproc_per_node, or resources.tasks_per_node); run it with one "
                          "process, or use a data-parallel method (iif, reward_only, pathwise, vargrad, am)")


def check_sizes(cfg: DictConfig) -> None:
    for key in ("iterations", "checkpoint_every", "eval_every"):
        if cfg[key] < (1 if key == "checkpoint_every" else 0):
            raise ConfigError(f"{key} must be {'>= 1' if key == 'checkpoint_every' else '>= 0'}, got {cfg[key]}")


def config_error_from(e: Exception) -> ConfigError | None:
    """A constructor that rejected its arguments (a ``ValueError`` naming the key, e.g. ``method.n_samples must be
    >= 1, got 0``) is the user's error: one line, not Hydra's instantiation traceback. ``None`` for anything else
    (a bug keeps its traceback)."""
    cause = e
    while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
        cause = cause.__cause__
    if cause is e or not isinstance(cause, ValueError):
        return None
    message = " ".join(str(cause).split())
    key = re.search(r"full_key: (\S+)", str(e))
    if key and key.group(1) not in message:
        message = f"{key.group(1)}: {message}"
    return ConfigError(message)


def check_cache_writable(base, choices: dict[str, str]) -> None:
    """A base model that pretrains and caches its weights (``cache_path()``) and finds none cached must be able to
    write them, or its pretraining is lost at the end (checked before pretraining; a read-only cache that already
    holds the weights is fine)."""
    if not hasattr(base, "cache_path") or (path := Path(base.cache_path())).exists():
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as e:
        raise ConfigError(
            f"base_model '{choices.get('base_model', '?')}' has no cached weights at {path} and cannot write them "
            f"there ({type(e).__name__}: {e.strerror or e}); set cache_dir (or IIF_CACHE) to a writable folder, or "
            "copy the weights there") from None


@dataclass
class Components:
    base: object
    reward: object
    method: object
    target: object
    evaluator: object
    prior: object
    budget: Budget
    device: torch.device = torch.device("cpu")


def build(cfg: DictConfig, device: torch.device = torch.device("cpu")) -> Components:
    """Instantiate every component from its ``_target_`` (cheap: no pretraining, no sampling); the networks are
    placed on ``device`` before the method (and its optimiser) is built."""
    prior = instantiate(cfg.prior)
    base = instantiate(cfg.base_model, prior=prior).place(device)  # with its schedule (base_model.schedule)
    reward = instantiate(cfg.reward)
    guidance = instantiate(cfg.guidance, base=base, reward=reward).to(device)
    sampler = instantiate(cfg.sampler)
    buffer = instantiate(cfg.buffer)
    conditions = instantiate(cfg.conditions)
    method = instantiate(cfg.method, base=base, reward=reward, sampler=sampler, guidance=guidance, buffer=buffer,
                         conditions=conditions)
    target = instantiate(cfg.target, prior=prior, reward=reward)
    evaluator = instantiate(cfg.evaluation)
    return Components(base, reward, method, target, evaluator, prior, Budget(base, reward), device)


def cleanup_failed_start(run_dir: Path) -> None:
    """Remove what this run created in ``run_dir`` if it failed before doing anything (no checkpoint). Every process
    of a multi-process run calls it (each may have created the directory or its log), so a file another process
    removed first is no error."""
    if (run_dir / CHECKPOINT).exists():
        return
    for name in (".hydra", "train.log", "config.yaml"):
        p = run_dir / name
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    try:
        run_dir.rmdir()  # only if empty
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(run_dir: Path, comp: Components, iteration: int, wall_s: float, run_id: str | None,
                    method_name: str, budget: dict[str, int], config: dict) -> None:
    """Rank 0's: the processes of a run hold the same state (``iif.distributed``); ``budget`` is the run's
    (:meth:`Budget.snapshot`, taken by every process); ``config`` the resolved config (checked on resume)."""
    atomic_torch_save({
        "format": CHECKPOINT_FORMAT, "method": method_name, "iteration": iteration, "wall_s": wall_s,
        "wandb_run_id": run_id, "rng": devices.rng_state(comp.device), "state": comp.method.state_dict(),
        "budget": budget, "config": config,
    }, run_dir / CHECKPOINT)


# Keys a resumed run may change: where and how fast it runs, how it logs, how often it checkpoints and evaluates.
# Everything else (the problem, the method and its settings, the seed, the number of iterations, which sets the
# learning-rate schedule) must be the checkpoint's, or the run would continue a different run's state.
RESUME_FREE = ("torch_threads", "device", "cache_dir", "checkpoint_every", "eval_every", "logger", "resources",
               "debug")


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def config_changes(saved: dict, current: dict) -> list[str]:
    """``key: checkpoint value -> current value`` for every setting that differs between a checkpoint's resolved
    config and this run's, keys under :data:`RESUME_FREE` excepted."""
    old, new = _flatten(saved), _flatten(current)
    free = tuple(f"{k}." for k in RESUME_FREE)

    def shown(tree: dict, k: str) -> str:
        return repr(tree[k]) if k in tree else "(absent)"

    return [f"{k}: {shown(old, k)} -> {shown(new, k)}" for k in sorted(old.keys() | new.keys())
            if not f"{k}.".startswith(free) and old.get(k, ...) != new.get(k, ...)]


def check_resumable(ckpt: dict, resolved: dict, run_dir: Path) -> None:
    """A checkpoint resumes only under its own config (checkpoints from before configs were stored: unchecked)."""
    if "config" not in ckpt:
        return
    if changes := config_changes(ckpt["config"], resolved):
        shown = "; ".join(changes[:8]) + (f"; and {len(changes) - 8} more" if len(changes) > 8 else "")
        raise ConfigError(f"{run_dir} holds a checkpoint of a run with other settings ({shown}). Resume it with its "
                          f"own settings, or give this run another directory (hydra.run.dir=... / hydra.sweep.dir=...)")


# Kill safety (scripts/kill_test.py SIGKILLs a run at random moments and checks that the restarted run ends
# identical to an uninterrupted one). Files are written atomically; a row of metrics.jsonl is written before the
# checkpoint of its iteration, so a run killed in between has rows past its checkpoint: resuming keeps the rows up to
# the checkpoint's iteration and recomputes the rest, so each iteration is logged once.
def rows_up_to(metrics_log: Path, iteration: int) -> list[str]:
    """The lines of ``metrics.jsonl`` of iterations ``<= iteration``. They end at the first line that does not
    parse: a last row torn by a kill (a write over a page, a network file system) would otherwise stop every
    resume with a JSON error."""
    kept = []
    for line in (metrics_log.read_text().splitlines() if metrics_log.exists() else []):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        if row["iteration"] <= iteration:
            kept.append(line)
    return kept


def remove_stale_temp_files(run_dir: Path) -> None:
    """Delete the temp files (``.<name>.<random>.tmp``) of atomic writes that a killed process left behind; each
    can be as large as a checkpoint and a requeued run would collect one per kill. Called at start-up, when no
    write of this process is in flight (one process runs in a run directory at a time)."""
    for path in run_dir.glob(".*.tmp"):
        path.unlink(missing_ok=True)


def load_checkpoint(path: Path, method_name: str) -> dict:
    try:
        ckpt = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # truncated, foreign or unsafe file
        raise ConfigError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}. Move it away to start afresh.")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{path} is not an iif checkpoint ({CHECKPOINT_FORMAT}); move it away to start afresh")
    if ckpt["method"] != method_name:
        raise ConfigError(f"{path} was written by method '{ckpt['method']}', this run is method '{method_name}'")
    return ckpt


# ---------------------------------------------------------------------------------------------- the run
def reset_peak_mem() -> None:
    """Start a new peak-memory window (several Hydra jobs can share one process)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
    try:  # Linux: writing 5 resets VmHWM, the peak resident set size
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_mem_mb() -> float:
    """Peak resident memory of this process since :func:`reset_peak_mem` (CPU; the process-lifetime peak where
    the kernel does not allow the reset), or peak allocated CUDA memory when on a GPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2 ** 20
    try:
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0]) / 1024
    except (OSError, IndexError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def evaluate(comp: Components, seed: int) -> tuple[dict, torch.Tensor]:
    with comp.budget.uncounted():  # evaluation is not part of the training budget
        return comp.evaluator(comp.method, comp.target, run_seed=seed)


def train(cfg: DictConfig, run_dir: str | Path, choices: dict[str, str]) -> dict:
    """Run (or resume) one run in ``run_dir``; returns the final metrics.

    In a run of several processes (``iif.distributed``) every process calls this; rank 0 writes the run directory
    and the experiment log, the others compute their share and write nothing.
    """
    run_dir = Path(run_dir)
    ranks = distributed.world()
    main = ranks.is_main
    run_dir.mkdir(parents=True, exist_ok=True)
    reset_peak_mem()
    method_name = choices.get("method", cfg.method._target_)
    try:  # ---- 1. validate and build: everything here is cheap, errors name the cause
        check_sizes(cfg)
        check_pairing(cfg, choices)
        check_world(cfg, choices, ranks)
        device = devices.resolve(cfg.get("device", "cpu"), ranks.local_rank)
        if cfg.get("torch_threads"):
            torch.set_num_threads(cfg.torch_threads)
        torch.manual_seed(cfg.seed)
        try:
            comp = build(cfg, device)
        except InstantiationException as e:  # a constructor rejected its arguments: name the key, one line
            if (error := config_error_from(e)) is None:
                raise
            raise error from e
        check_cache_writable(comp.base, choices)
        ckpt_path = run_dir / CHECKPOINT
        ckpt = load_checkpoint(ckpt_path, method_name) if ckpt_path.exists() else None
        resolved = OmegaConf.to_container(cfg, resolve=True)
        if ckpt is not None:
            check_resumable(ckpt, resolved, run_dir)
    except Exception:
        cleanup_failed_start(run_dir)
        raise
    if main:
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        comp.base.prepare()  # may pretrain (cached)
    ranks.barrier()  # every process has read the checkpoint before rank 0 writes one, and the base model's cache
    if not main:
        comp.base.prepare()
    ranks.check_replicated(comp.base.state_dict(), "the base model's weights")

    start, wall_s, run_id = 0, 0.0, None
    if ckpt is not None:  # ---- 2. resume
        comp.method.load_state_dict(ckpt["state"])
        devices.set_rng_state(ckpt["rng"], comp.device)
        comp.budget.restore(ckpt["budget"])
        start, wall_s, run_id = ckpt["iteration"], ckpt["wall_s"], ckpt["wandb_run_id"]
        log.info("resuming %s from iteration %d", run_dir, start)
    devices.set_rng_state(ranks.broadcast(devices.rng_state(comp.device)), comp.device)  # one shared random stream
    metrics_log = run_dir / "metrics.jsonl"
    if main:
        atomic_write_text(metrics_log, "".join(l + "\n" for l in rows_up_to(metrics_log, start)))
        remove_stale_temp_files(run_dir)

    exp = choices.get("experiment", "run")
    logger = instantiate(cfg.logger) if main else NullLogger()
    logger.start(run_dir, resolved, name=f"{exp}-{method_name}-{choices.get('base_model', '')}-s{cfg.seed}",
                 group=exp, run_id=run_id, tags=run_tags(cfg, choices))
    log.info("run %s: method=%s base_model=%s, %d iterations, %s", run_dir, method_name,
             choices.get("base_model"), cfg.iterations, _derived(cfg, ranks))
    exit_code = 1
    try:
        if ckpt is None:
            t0 = time.perf_counter()
            comp.method.setup()
            wall_s += time.perf_counter() - t0
            budget = comp.budget.snapshot()
            if main:
                save_checkpoint(run_dir, comp, 0, wall_s, logger.run_id, method_name, budget, resolved)
        # ---- 3. the loop
        with (metrics_log.open("a") if main else open(os.devnull, "w")) as f:
            for it in trange(start, cfg.iterations, desc=f"{method_name}", initial=start, total=cfg.iterations,
                             disable=not (main and progress_enabled())):
                t0 = time.perf_counter()
                row = comp.method.fit_step(it)
                wall_s += time.perf_counter() - t0
                budget = comp.budget.snapshot()
                row = {"iteration": it + 1, "wall_s": wall_s, **budget, **row}
                if cfg.eval_every and (it + 1) % cfg.eval_every == 0:
                    row.update(evaluate(comp, cfg.seed)[0])
                f.write(json.dumps(row) + "\n")
                f.flush()
                logger.log(row, step=it + 1)
                if main and ((it + 1) % cfg.checkpoint_every == 0 or it + 1 == cfg.iterations):
                    save_checkpoint(run_dir, comp, it + 1, wall_s, logger.run_id, method_name, budget, resolved)
        # ---- 4. final evaluation
        final, samples = evaluate(comp, cfg.seed)
        final.update(wall_s=wall_s, peak_mem_mb=peak_mem_mb(), **comp.budget.snapshot(), iterations=cfg.iterations,
                     seed=cfg.seed, method=method_name, base_model=choices.get("base_model"), experiment=exp)
        if ranks.size > 1:  # the slowest process's time and the largest process's memory
            final.update(ranks.max({"wall_s": wall_s, "peak_mem_mb": final["peak_mem_mb"]}), processes=ranks.size)
        if not main:  # wait for rank 0 to write the run's files: a process that ends first ends the run for torchrun
            ranks.barrier()
            exit_code = 0
            return final
        atomic_torch_save(samples[:4000].clone(), run_dir / "samples.pt")
        with torch.random.fork_rng():
            torch.manual_seed(0)
            prior_samples = comp.prior.sample(4000)
        fig = toy_figure({method_name: samples}, comp.target, prior_samples)
        fig.savefig(run_dir / "samples.png", dpi=110)
        # metrics.json last: it marks a finished run (iif-table and iif-reproduce read only runs that have it); a
        # run killed before it resumes from its final checkpoint and evaluates again, to the same numbers.
        atomic_write_text(run_dir / "metrics.json", json.dumps(final, indent=2) + "\n")
        logger.log({k: v for k, v in final.items() if isinstance(v, (int, float))}, step=cfg.iterations)
        logger.log_figure("samples", fig, step=cfg.iterations)
        plt.close(fig)
        log.info("final metrics: %s", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in final.items()})
        ranks.barrier()
        exit_code = 0
        return final
    finally:
        logger.finish(exit_code)


def run_tags(cfg: DictConfig, choices: dict[str, str]) -> list[str]:
    """Tags for the experiment logger: the chosen options that tell runs of one experiment apart, the seed, and in
    a multirun the sweep (its directory's name), so the runs of one sweep can be filtered out of the group."""
    tags = [f"{g}={choices[g]}" for g in ("method", "base_model", "reward", "sampler") if choices.get(g)]
    tags.append(f"seed={cfg.seed}")
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        tags.append(f"sweep={Path(HydraConfig.get().sweep.dir).name}")
    return tags


def _derived(cfg: DictConfig, ranks: distributed.World = distributed.World()) -> str:
    """The sizes a user wants to see (nanoGPT style); in a run of several processes, each one's share."""
    m = cfg.method
    per = {k: f" ({m[k] // ranks.size} per process)" for k in ("n_samples", "batch_size") if k in m and ranks.size > 1}
    sizes = [f"{k} {m[k]}{per.get(k, '')}" for k in ("n_samples", "batch_size", "grad_steps", "k") if k in m]
    if "acceptance" in m:
        sizes.append(f"acceptance {list(m.acceptance['values'])}")
    procs = f"{ranks.size} processes; " if ranks.size > 1 else ""
    return procs + f"{cfg.sampler.n_steps} sampling steps; " + (", ".join(sizes) if sizes else "no training")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")  # absolute: the console script too
def _hydra_main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    if not distributed.init_from_env().is_main:  # a submitit task of a multi-task job joins here (torchrun: main())
        logging.getLogger().setLevel(logging.WARNING)
    apply_debug_overrides(cfg, list(hc.overrides.task))
    try:
        final = train(cfg, hc.runtime.output_dir, dict(hc.runtime.choices))
    except (ConfigError, RunError) as e:
        # In a submitit job (launcher=slurm|slurm_local) raise: submitit records only exceptions as a job's result,
        # and the submitting process, which sees a job die otherwise only through sacct, would wait for it forever.
        if os.environ.get("SUBMITIT_EXECUTOR"):
            raise
        if distributed.world().is_main:  # every process of a multi-process run stops alike; one says why
            print(f"iif-train: error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, ConfigError) else 1)  # 2: nothing was run; 1: the run stopped
    return final.get("mode_tv")


def main() -> None:
    """``iif-train``; under ``torchrun`` every process runs it, and they join one process group first (so that they
    agree on the run directory's time stamp); only rank 0 writes Hydra's ``.hydra/`` record."""
    ranks = distributed.init_from_env()
    if not ranks.is_main:
        sys.argv.append("hydra.output_subdir=null")
    try:
        _hydra_main()
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main()
