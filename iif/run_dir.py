"""The run directory: its checkpoint, its metrics log and its results, written so that a run killed at any moment
(SIGKILL, a SLURM requeue) resumes to the result of an uninterrupted one.

    config.yaml      the resolved config                    metrics.jsonl  one row per iteration
    checkpoint.pt    everything needed to continue          samples.pt, <figure>.png, metrics.json (last)

Kill safety (``scripts/kill_test.py`` SIGKILLs runs at the points of ``iif.faults`` and at random moments). Files
are written atomically (temp file + rename). A row of ``metrics.jsonl`` is written before the checkpoint of its
iteration, so a run killed in between has rows past its checkpoint: resuming keeps the rows up to the checkpoint's
iteration and recomputes the rest, so each iteration is logged once. ``metrics.json`` is written last: it marks a
finished run (``iif-table`` and ``iif-reproduce`` read only runs that have it).
"""
from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from iif.faults import fault_point
from iif.utils import ConfigError, atomic_torch_save, atomic_write_text

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = "iif-checkpoint-v1"
CHUNKS = 16  # a checkpoint's bytes are written in pieces, a fault point after each (kill tests land inside)
# Keys a resumed run may change: where and how fast it runs, how it logs, how often it checkpoints and evaluates.
# Everything else (the problem, the method and its settings, the seed, the number of iterations, which sets the
# learning-rate schedule) must be the checkpoint's, or the run would continue a different run's state.
RESUME_FREE = ("torch_threads", "device", "cache_dir", "checkpoint_every", "eval_every", "logger", "resources")


# ---------------------------------------------------------------------------------------------- checkpoint
def save_checkpoint(run_dir: Path, iteration: int, state: dict) -> None:
    """Write ``checkpoint.pt`` of ``iteration`` atomically: ``state`` (the method's state, RNG states, budget, W&B
    run id, resolved config...) with the format tag and the iteration. Rank 0's: the processes of a run hold the
    same state (``iif.distributed``)."""
    fault_point("checkpoint", iteration)
    buffer = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, "iteration": iteration, **state}, buffer)
    data, path = buffer.getvalue(), run_dir / CHECKPOINT
    size = -(-len(data) // CHUNKS)
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=f".{CHECKPOINT}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for k in range(CHUNKS):
                f.write(data[k * size:(k + 1) * size])
                f.flush()
                fault_point("checkpoint_chunk", iteration)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(run_dir: Path, method_name: str, config: dict) -> dict | None:
    """The checkpoint in ``run_dir`` (None: there is none), refused with a :class:`ConfigError` if it cannot be
    read, is not an iif checkpoint, or was written by another method or under other settings (``config``: this
    run's resolved config; checkpoints from before configs were stored are not checked)."""
    path = run_dir / CHECKPOINT
    if not path.exists():
        return None
    try:
        ckpt = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # truncated, foreign or unsafe file
        raise ConfigError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}. Move it away to start afresh.")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{path} is not an iif checkpoint ({CHECKPOINT_FORMAT}); move it away to start afresh")
    if ckpt["method"] != method_name:
        raise ConfigError(f"{path} was written by method '{ckpt['method']}', this run is method '{method_name}'")
    if "config" in ckpt and (changes := config_changes(ckpt["config"], config)):
        shown = "; ".join(changes[:8]) + (f"; and {len(changes) - 8} more" if len(changes) > 8 else "")
        raise ConfigError(f"{run_dir} holds a checkpoint of a run with other settings ({shown}). Resume it with its "
                          f"own settings, or give this run another directory (hydra.run.dir=... / hydra.sweep.dir=...)")
    return ckpt


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


# ---------------------------------------------------------------------------------------------- metrics and results
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


def restart_at(run_dir: Path, iteration: int) -> Path:
    """Prepare ``run_dir`` for a run that continues after ``iteration`` (0: a fresh run): ``metrics.jsonl`` keeps
    the rows up to it, and the temp files (``.<name>.<random>.tmp``) of atomic writes that a killed process left
    behind are deleted (each can be as large as a checkpoint, and a requeued run would collect one per kill; no
    write of this run is in flight: one process writes a run directory at a time). Returns ``metrics.jsonl``."""
    metrics_log = run_dir / "metrics.jsonl"
    atomic_write_text(metrics_log, "".join(line + "\n" for line in rows_up_to(metrics_log, iteration)))
    for path in run_dir.glob(".*.tmp"):
        path.unlink(missing_ok=True)
    return metrics_log


def write_results(run_dir: Path, final: dict, samples: torch.Tensor, figures: dict) -> None:
    """``samples.pt`` (the first 4000), each figure as ``<name>.png``, then ``metrics.json``: last, because it marks
    a finished run; a run killed before it resumes from its final checkpoint and evaluates again, to the same
    numbers."""
    atomic_torch_save(samples[:4000].clone(), run_dir / "samples.pt")
    for name, fig in figures.items():
        fig.savefig(run_dir / f"{name}.png", dpi=110)
    fault_point("metrics_json", final.get("iterations", 0))
    atomic_write_text(run_dir / "metrics.json", json.dumps(final, indent=2) + "\n")


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
