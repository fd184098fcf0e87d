"""Named points of a run where a test can kill it: fault injection without patching the code.

The training loop (``iif.train``) and the checkpoint writer (``iif.run_dir``) call :func:`fault_point` at the
moments :data:`POINTS` lists. Two environment variables make the points act; with neither set a point does nothing
but read them.

* ``IIF_FAULT=<point>[@<iteration>][:<count>][+<seconds>]``: the process kills itself with SIGKILL the
  ``count``-th time (default: the first) it reaches ``point`` (at ``iteration``, where given), at once or
  ``seconds`` later from a helper process (the kill then lands inside whatever runs at that moment). Examples:
  ``checkpoint_chunk@3:8`` (after 8 of the 16 pieces of iteration 3's checkpoint are written), ``step_done@5``
  (after iteration 5's method step, before its metrics row), ``step@5+0.02`` (20 ms into iteration 5's step).
* ``IIF_FAULT_TRACE=<file>``: every point appends the line ``<time.monotonic()> <point> <iteration> <count>`` to
  the file with one unbuffered write, so the file is complete up to the moment of a kill (``count``: the how-many-th
  time this process reaches the point at that iteration). ``scripts/kill_test.py`` times its kills from it.

Counts are the process's (the jobs of a multirun in one process count together); in a run of several processes
each process that reaches the point acts on it (only rank 0 writes checkpoints).
"""
from __future__ import annotations

import functools
import os
import re
import signal
import time
from collections import Counter

FAULT, TRACE = "IIF_FAULT", "IIF_FAULT_TRACE"
# every point, in the order a fresh run meets them; the iteration is 0 where none applies
POINTS = {
    "start": "train() is called: the config is composed, nothing is built yet",
    "setup": "a fresh run, before the method's set-up (e.g. IIF's buffer prefill); no checkpoint exists yet",
    "checkpoint": "before the checkpoint of the iteration is serialised",
    "checkpoint_chunk": "after each of the 16 pieces of the checkpoint's temp file (before fsync and rename)",
    "step": "before the method step of the iteration (its sampling and training)",
    "step_done": "after the method step of the iteration, before its metrics row is written",
    "evaluation": "before the final evaluation",
    "final_files": "after the final evaluation, before samples.pt, the figures and metrics.json",
    "metrics_json": "after samples.pt and the figures, before metrics.json (which marks a finished run)",
    "end": "the run is complete",
}
_SPEC = re.compile(r"(?P<point>\w+)(@(?P<iteration>\d+))?(:(?P<count>\d+))?(\+(?P<delay>[\d.]+))?")
_counts: Counter = Counter()


@functools.lru_cache(maxsize=4)
def parse(spec: str) -> tuple[str, int | None, int, float]:
    """``IIF_FAULT``'s value as ``(point, iteration or None, count, delay_s)``."""
    m = _SPEC.fullmatch(spec.strip())
    if m is None or m["point"] not in POINTS:
        raise ValueError(f"{FAULT}={spec!r}: expected <point>[@<iteration>][:<count>][+<seconds>] with a point "
                         f"among {', '.join(POINTS)}")
    iteration = None if m["iteration"] is None else int(m["iteration"])
    return m["point"], iteration, int(m["count"] or 1), float(m["delay"] or 0.0)


def fault_point(name: str, iteration: int = 0) -> None:
    """The run passes the point ``name`` (one of :data:`POINTS`) at ``iteration``: trace it, kill where asked."""
    fault, trace = os.environ.get(FAULT), os.environ.get(TRACE)
    if not (fault or trace):
        return
    _counts[name, iteration] += 1
    _counts[name, None] += 1
    if trace:
        fd = os.open(trace, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{time.monotonic():.6f} {name} {iteration} {_counts[name, iteration]}\n".encode())
        finally:
            os.close(fd)
    if fault:
        point, at, count, delay = parse(fault)
        if point == name and (at is None or at == iteration) and _counts[name, at] == count:
            if delay > 0:
                _kill_later(delay)
            else:
                os.kill(os.getpid(), signal.SIGKILL)


def _kill_later(delay: float) -> None:
    """SIGKILL this process ``delay`` seconds from now, from a forked helper process: a thread would wait for the
    GIL, which C code (a figure's rendering, say) can hold for longer than the delay. The helper holds no file of
    the run open, and kills nothing if the run has ended first."""
    parent = os.getpid()
    if os.fork() == 0:
        try:
            os.closerange(0, os.sysconf("SC_OPEN_MAX"))
            time.sleep(delay)
            if os.getppid() == parent:
                os.kill(parent, signal.SIGKILL)
        finally:
            os._exit(0)
