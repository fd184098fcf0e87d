"""``iif.faults``: the syntax of IIF_FAULT, the trace, and that a process dies with SIGKILL at the asked
occurrence of a point (and only there)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from iif import faults
from iif.faults import fault_point, parse

SCRIPT = ("from iif.faults import fault_point\n"
          "for it in (1, 2, 3):\n"
          "    fault_point('step', it); print('step', it, flush=True)\n"
          "import time; time.sleep(float({sleep}))\n"
          "print('end', flush=True)\n")


def run(fault: str | None, tmp_path, sleep: float = 0.0) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != faults.FAULT}
    env[faults.TRACE] = str(tmp_path / "trace")
    if fault:
        env[faults.FAULT] = fault
    return subprocess.run([sys.executable, "-c", SCRIPT.format(sleep=sleep)], env=env, capture_output=True,
                          text=True, timeout=60)


def test_syntax():
    assert parse("checkpoint_chunk@3:8") == ("checkpoint_chunk", 3, 8, 0.0)
    assert parse("step+0.05") == ("step", None, 1, 0.05)
    assert parse("end") == ("end", None, 1, 0.0)
    for bad in ("chekpoint@3", "step@x", "step:"):
        with pytest.raises(ValueError, match="point among start, setup"):
            parse(bad)  # a misspelt point is an error, not a run that is never killed


def test_killed_at_the_asked_occurrence(tmp_path):
    proc = run("step@2", tmp_path)
    assert proc.returncode == -signal.SIGKILL and proc.stdout.split("\n")[:-1] == ["step 1"]
    assert [line.split()[1:] for line in (tmp_path / "trace").read_text().splitlines()] == [
        ["step", "1", "1"], ["step", "2", "1"]]
    assert run("step:3", tmp_path).stdout.split("\n")[:-1] == ["step 1", "step 2"]


def test_delayed_kill_lands_later(tmp_path):
    t0 = time.monotonic()
    proc = run("step@3+0.3", tmp_path, sleep=30)
    assert proc.returncode == -signal.SIGKILL and "step 3" in proc.stdout and "end" not in proc.stdout
    assert 0.3 <= time.monotonic() - t0 < 20


def test_without_a_fault_nothing_happens(tmp_path, monkeypatch):
    proc = run(None, tmp_path)
    assert proc.returncode == 0 and proc.stdout.endswith("end\n")
    monkeypatch.delenv(faults.FAULT, raising=False)
    monkeypatch.delenv(faults.TRACE, raising=False)
    fault_point("step", 1)  # in this process: no variable set, no effect
