"""``iif-train``: one fine-tuning run, configured by Hydra (``conf/``).

Reads top to bottom: validate → seed → build → resume if the run directory holds a checkpoint → loop (method step,
log, evaluate, checkpoint) → final evaluation → samples, figures, ``metrics.json``. Beside it: the config and what
it says about a run (``iif.config``), the start-up checks (``iif.checks``), the components (``iif.build``), the run
directory and its checkpoint (``iif.run_dir``), the evaluators (``iif.metrics``), the named points where tests kill
a run (``iif.faults``).

    iif-train experiment=toy2d method=iif
    iif-train -m experiment=toy2d method=iif,reward_only seed=0,1,2
    iif-train --cfg job experiment=toy2d debug=fast      # print the config that would run, run nothing
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import trange

from iif import device as devices
from iif import distributed
from iif import run_dir as rundir
from iif.build import Components, build
from iif.checks import check_cache_writable, check_pairing, check_sizes, check_world
from iif.config import CONF_DIR, derived_sizes, run_name, run_tags
from iif.faults import fault_point
from iif.hub import with_prefetch_command
from iif.loggers.null import NullLogger
from iif.metrics.base import Evaluation
from iif.probes import peak_mem_mb, reset_peak_mem
from iif.utils import ConfigError, RunError, atomic_write_text, progress_enabled

log = logging.getLogger("iif.train")


def evaluate(comp: Components, seed: int, **kwargs) -> Evaluation:
    with comp.budget.uncounted():  # evaluation is not part of the training budget
        return comp.evaluator(comp.method, run_seed=seed, **kwargs)


def train(cfg: DictConfig, run_dir: str | Path, choices: dict[str, str]) -> dict:
    """Run (or resume) one run in ``run_dir``; returns the final metrics. In a run of several processes
    (``iif.distributed``) every process calls this; rank 0 writes the run directory and the experiment log."""
    fault_point("start")
    run_dir, ranks = Path(run_dir), distributed.world()
    main, method_name = ranks.is_main, choices.get("method", cfg.method._target_)
    run_dir.mkdir(parents=True, exist_ok=True)
    reset_peak_mem()
    try:  # ---- 1. validate and build: everything here is cheap, errors name the cause
        check_sizes(cfg)
        check_pairing(cfg, choices)
        check_world(cfg, choices, ranks)
        device = devices.resolve(cfg.get("device", "cpu"), ranks.local_rank)
        if cfg.get("torch_threads"):
            torch.set_num_threads(cfg.torch_threads)
        torch.manual_seed(cfg.seed)
        comp = build(cfg, device)
        check_cache_writable(comp.base, choices)
        resolved = OmegaConf.to_container(cfg, resolve=True)
        ckpt = rundir.load_checkpoint(run_dir, method_name, resolved)  # None: a fresh run
    except Exception:
        rundir.cleanup_failed_start(run_dir)
        raise
    try:  # may pretrain the base model and a classifier, fetch data, compute a reference (all cached)
        if main:
            atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
            comp.prepare()
        ranks.barrier()  # every process has read the checkpoint before rank 0 writes one, and the base model's cache
        if not main:
            comp.prepare()
    except Exception:
        rundir.cleanup_failed_start(run_dir)  # e.g. missing data: one error line, no half-made run directory
        raise
    ranks.check_replicated(comp.base.state_dict(), "the base model's weights")

    start, wall_s, run_id = 0, 0.0, None
    if ckpt is not None:  # ---- 2. resume
        comp.method.load_state_dict(ckpt["state"])
        devices.set_rng_state(ckpt["rng"], comp.device)
        comp.budget.restore(ckpt["budget"])
        start, wall_s, run_id = ckpt["iteration"], ckpt["wall_s"], ckpt["wandb_run_id"]
        log.info("resuming %s from iteration %d", run_dir, start)
    devices.set_rng_state(ranks.broadcast(devices.rng_state(comp.device)), comp.device)  # one shared random stream
    metrics_log = rundir.restart_at(run_dir, start) if main else Path(os.devnull)

    exp = choices.get("experiment", "run")
    logger = instantiate(cfg.logger) if main else NullLogger()
    logger.start(run_dir, resolved, name=run_name(cfg, choices), group=exp, run_id=run_id, tags=run_tags(cfg, choices))
    log.info("run %s: method=%s base_model=%s, %d iterations, %s", run_dir, method_name,
             choices.get("base_model"), cfg.iterations, derived_sizes(cfg, ranks))

    def checkpoint(iteration: int, budget: dict) -> None:  # rank 0's; the budget is the run's (every process's)
        rundir.save_checkpoint(run_dir, iteration, {
            "method": method_name, "wall_s": wall_s, "wandb_run_id": logger.run_id, "budget": budget,
            "rng": devices.rng_state(comp.device), "state": comp.method.state_dict(), "config": resolved})

    exit_code = 1
    try:
        if ckpt is None:
            fault_point("setup")
            t0 = time.perf_counter()
            comp.method.setup()
            wall_s += time.perf_counter() - t0
            budget = comp.budget.snapshot()
            if main:
                checkpoint(0, budget)
        # ---- 3. the loop
        with metrics_log.open("a") as f:
            for it in trange(start, cfg.iterations, desc=f"{method_name}", initial=start, total=cfg.iterations,
                             disable=not (main and progress_enabled())):
                fault_point("step", it + 1)
                t0 = time.perf_counter()
                row = comp.method.fit_step(it)
                wall_s += time.perf_counter() - t0
                fault_point("step_done", it + 1)
                budget = comp.budget.snapshot()
                row = {"iteration": it + 1, "wall_s": wall_s, **budget, **row}
                if cfg.eval_every and (it + 1) % cfg.eval_every == 0:
                    row.update(evaluate(comp, cfg.seed).metrics)
                f.write(json.dumps(row) + "\n")
                f.flush()
                logger.log(row, step=it + 1)
                if main and ((it + 1) % cfg.checkpoint_every == 0 or it + 1 == cfg.iterations):
                    checkpoint(it + 1, budget)
        # ---- 4. final evaluation
        train_peak_mb = peak_mem_mb()  # training's (the evaluation's batches may need more or less)
        fault_point("evaluation", cfg.iterations)
        result = evaluate(comp, cfg.seed, figures=main, label=method_name)
        final = {**result.metrics, "wall_s": wall_s, "peak_mem_mb": peak_mem_mb(), "train_peak_mem_mb": train_peak_mb,
                 "device": devices.describe(comp.device),
                 **comp.budget.snapshot(),
                 "iterations": cfg.iterations, "seed": cfg.seed, "method": method_name,
                 "base_model": choices.get("base_model"), "experiment": exp}
        if ranks.size > 1:  # the slowest process's time and the largest process's memory
            final.update(ranks.max({"wall_s": wall_s, "peak_mem_mb": final["peak_mem_mb"],
                                    "train_peak_mem_mb": train_peak_mb}), processes=ranks.size)
        final["device_hours"] = final["wall_s"] * ranks.size / 3600  # the slowest process's time x processes
        if main:
            fault_point("final_files", cfg.iterations)
            rundir.write_results(run_dir, final, result.samples, result.figures)  # metrics.json last
            logger.log({k: v for k, v in final.items() if isinstance(v, (int, float))}, step=cfg.iterations)
            for name, fig in result.figures.items():
                logger.log_figure(name, fig, step=cfg.iterations)
            result.close()
            log.info("final metrics: %s", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in final.items()})
        ranks.barrier()  # the others wait for rank 0's files: a process that ends first ends the run for torchrun
        fault_point("end", cfg.iterations)
        exit_code = 0
        return final
    finally:
        logger.finish(exit_code)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")  # absolute: the console script too
def _hydra_main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    if not distributed.init_from_env().is_main:  # a submitit task of a multi-task job joins here (torchrun: main())
        logging.getLogger().setLevel(logging.WARNING)
    try:
        final = train(cfg, hc.runtime.output_dir, dict(hc.runtime.choices))
    except (ConfigError, RunError) as error:
        e = with_prefetch_command(error, list(hc.overrides.task))  # a missing hub weight: the exact fetch command
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
