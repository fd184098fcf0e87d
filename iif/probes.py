"""What a run measures about the machine it runs on: peak memory."""
from __future__ import annotations

import resource
from pathlib import Path

import torch


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
