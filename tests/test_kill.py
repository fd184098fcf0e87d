"""A toy run killed with SIGKILL at chosen moments and restarted in the same run directory ends identical to an
uninterrupted run with the same seed (``scripts/kill_test.py`` is the 20-kill, random-moment version).

Each kill is forced deterministically through the fault points of ``iif.faults``: the run is started unchanged
(``python -m iif.train``) with ``IIF_FAULT=<point>@<iteration>:<count>``, and kills itself there; its points are
traced (``IIF_FAULT_TRACE``), so the test sees where it died. The file states after each kill and the final results
are read from the run directories themselves."""
from __future__ import annotations

import pytest
import importlib.util
import json
import signal
from pathlib import Path

import torch

pytestmark = pytest.mark.slow  # multi-process, Slurm, CLI or pretraining: minutes; `make test` runs it

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("kill_test", ROOT / "scripts" / "kill_test.py")
kill_test = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kill_test)

# toy2d, gmm_exact, iif, debug=fast, iterations=8, checkpoint_every=1, logger=none, seed=0; one torch thread: the
# tensors are tiny and on a busy machine a second thread only waits (the script runs with torch's default)
RUN = [*kill_test.RUN, "torch_threads=1"]
KILLED = -signal.SIGKILL


def launch(run_dir: Path, trace: Path, fault: str | None = None) -> int:
    proc = kill_test.start(run_dir, trace, RUN, fault=fault, output=run_dir.parent / f"{run_dir.name}.out")
    return proc.wait(timeout=300)


def checkpoint_iteration(run_dir: Path) -> int:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["iteration"]


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def last_point(trace: Path) -> tuple[str, int, int]:
    _, point, iteration, count = trace.read_text().splitlines()[-1].split()
    return point, int(iteration), int(count)


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    reference, run, trace = tmp_path / "reference", tmp_path / "killed", tmp_path / "trace"
    assert launch(reference, tmp_path / "reference.trace") == 0
    points = [line.split()[1:3] for line in (tmp_path / "reference.trace").read_text().splitlines()]
    assert points[:3] == [["start", "0"], ["setup", "0"], ["checkpoint", "0"]] and points[-1] == ["end", "8"]

    # 1. in the first start, as the buffer prefill begins: no checkpoint yet
    assert launch(run, trace, "setup") == KILLED
    assert last_point(trace) == ("setup", 0, 1)
    assert not (run / "checkpoint.pt").exists()

    # 2. in the middle of writing iteration 3's checkpoint (8 of 16 pieces): the checkpoint of iteration 2 is intact,
    # row 3 is already logged (rows are written before their checkpoint), half a temp file is left behind
    assert launch(run, trace, "checkpoint_chunk@3:8") == KILLED
    assert last_point(trace) == ("checkpoint_chunk", 3, 8)
    assert checkpoint_iteration(run) == 2
    assert [r["iteration"] for r in rows(run)] == [1, 2, 3]
    (temp,) = run.glob(".checkpoint.pt.*.tmp")
    assert 0 < temp.stat().st_size < (run / "checkpoint.pt").stat().st_size
    # and a last row torn in the middle, as a kill during a long write (or a network file system) can leave one
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"iteration": 4, "accept_ra')

    # 3. after iteration 5's method step (sampled, weighted, trained), before its row: resumed from 2, iterations 3
    # and 4 done again, each logged once; the torn row and the stale temp file are gone
    assert launch(run, trace, "step_done@5") == KILLED
    assert last_point(trace) == ("step_done", 5, 1)
    assert checkpoint_iteration(run) == 4
    assert [r["iteration"] for r in rows(run)] == [1, 2, 3, 4]
    assert list(run.glob(".*.tmp")) == []

    # 4. after the final evaluation and the figure, just before metrics.json is written: no metrics.json yet (it is
    # written last, so a run that has one is complete)
    assert launch(run, trace, "metrics_json@8") == KILLED
    assert last_point(trace) == ("metrics_json", 8, 1)
    assert checkpoint_iteration(run) == 8
    assert (run / "samples.png").exists() and not (run / "metrics.json").exists()

    assert launch(run, trace) == 0  # runs to the end
    ref, got = (json.loads((d / "metrics.json").read_text()) for d in (reference, run))
    for key in ("mode_tv", "energy_distance", "reward_mean", "sc_loss", "kl_path", "top_mode_frac",
                "base_nfe", "reward_evals", "reward_grad_evals", "iterations"):
        assert got[key] == ref[key], key  # exactly: same floats, same counts
    assert ref["base_nfe"] == 256 * 20 + 8 * (256 * 20 + 5 * 128)  # prefill + 8 x (sampling + gradient steps)
    got_rows, ref_rows = rows(run), rows(reference)
    assert [r["iteration"] for r in got_rows] == list(range(1, 9))
    for a, b in zip(got_rows, ref_rows):
        assert {k: v for k, v in a.items() if k != "wall_s"} == {k: v for k, v in b.items() if k != "wall_s"}
    assert torch.equal(torch.load(run / "samples.pt", weights_only=True),
                       torch.load(reference / "samples.pt", weights_only=True))
