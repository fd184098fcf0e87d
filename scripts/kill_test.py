"""Kill test: a toy run is killed with SIGKILL at random moments and restarted in the same run directory until it
finishes; its final metrics must equal those of an uninterrupted run with the same seed.

    python scripts/kill_test.py                          # 20 kills -> outputs/bench/kill_test.json
    python scripts/kill_test.py --kills 5 --plan-seed 1  # replay a plan (the JSON records its seed)
    python scripts/kill_test.py -- method=reward_only    # extra overrides for both runs

1. Reference: ``python -m iif.train`` with :data:`RUN` (the toy, analytic base, IIF, ``debug=fast``, 8 iterations,
   a checkpoint every iteration, no logger, seed 0) and the extra overrides, uninterrupted, with its fault points
   traced (``IIF_FAULT_TRACE``, see ``iif.faults``): when it passed each point.
2. Killed: the same command in a second run directory, killed at each planned moment and started again in the
   same directory (as a SLURM requeue would) until it finishes.
3. Verdict: ``metrics.json`` of both runs equal in every field except ``wall_s`` and ``peak_mem_mb`` (the brief's
   ``mode_tv``, ``energy_distance``, ``reward_mean``, ``sc_loss`` and the budget counts are listed one by one);
   ``metrics.jsonl`` of the killed run holds each iteration exactly once and every row equals the reference's
   (``wall_s`` aside); ``samples.pt`` equal. Written to ``outputs/bench/kill_test.json`` and printed.

Where kills land. The run is started unchanged; it kills itself through the fault points of ``iif.faults``: each
launch gets ``IIF_FAULT`` naming a point and, for a moment inside a phase, a delay after it drawn uniformly over
5-95 % of the time the reference spent from that point to the next one. The phases of a plan:

===============  ===========================  ====================================================================
phase            ``IIF_FAULT``                where the kill lands
===============  ===========================  ====================================================================
``python``       (none)                       interpreter start, imports, Hydra's composition: this script sends
                                              SIGKILL after a part of the reference's time from spawn to ``start``
``startup``      ``start+<delay>``            build, reading the checkpoint, the base model, the logger's start
``setup``        ``setup+<delay>``            a fresh run's set-up (the buffer prefill), before any checkpoint
``step``         ``step@<k>+<delay>``         iteration k's method step (sampling, weights, gradient steps)
``checkpoint``   ``checkpoint_chunk@<k>:<j>``  inside iteration k's checkpoint write: after j of its 16 pieces
``evaluation``   ``evaluation@<K>+<delay>``   the final evaluation (its sampling, metrics and figure)
``final_files``  ``final_files@<K>+<delay>``  ``samples.pt``, the figure, ``metrics.json``
===============  ===========================  ====================================================================

The plan: the first kill falls in the set-up of the first start (before any checkpoint), then one each in a
checkpoint write, a step, the final evaluation, the final files, start-up and Python's start, then steps and
checkpoint writes in turn; each gets a random iteration (sorted, so the run moves on). Where a kill actually
landed is read back from the trace (its last line), with the checkpoint on disk, the ``metrics.jsonl`` rows and
the temp files after the kill.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN = ["experiment=toy2d", "base_model=gmm_exact", "method=iif", "debug=fast", "iterations=8", "checkpoint_every=1",
       "logger=none", "seed=0"]
# metrics.json fields that measure the machine, not the run: the only ones allowed to differ
NOT_COMPARED = ("wall_s", "peak_mem_mb")
REPORTED = ("mode_tv", "energy_distance", "reward_mean", "sc_loss", "base_nfe", "reward_evals", "reward_grad_evals")
CHUNKS = 16  # pieces of a checkpoint write (iif.run_dir.CHUNKS)
# the kills of a plan, first ones first (see the module docstring); then CYCLE in turn
FIRST = ("setup", "checkpoint", "step", "evaluation", "final_files", "startup", "python")
CYCLE = ("step", "checkpoint")
# phase -> (fault point that starts it, the point that ends it in the reference); iteration: see draw_plan
BOUNDS = {"python": (None, "start"), "startup": ("start", None), "setup": ("setup", "checkpoint"),
          "step": ("step", "step_done"), "evaluation": ("evaluation", "final_files"),
          "final_files": ("final_files", "end")}
IN_LOOP = ("step", "checkpoint")  # phases whose iteration is the next one to run


def child_env(fault: str | None, trace: Path) -> dict:
    env = {**os.environ, "CI": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1",
           "IIF_FAULT_TRACE": str(trace)}
    env.pop("IIF_FAULT", None)
    return env if fault is None else {**env, "IIF_FAULT": fault}


def start(run_dir: Path, trace: Path, overrides: list[str], *, fault: str | None = None,
          output: Path | None = None) -> subprocess.Popen:
    """Start ``python -m iif.train`` in ``run_dir``, tracing its fault points to ``trace`` and, with ``fault``
    (``IIF_FAULT``'s syntax), killing itself there."""
    out = open(output or os.devnull, "ab")
    try:
        return subprocess.Popen([sys.executable, "-m", "iif.train", *overrides, f"hydra.run.dir={run_dir}"],
                                cwd=ROOT, env=child_env(fault, trace), stdout=out, stderr=subprocess.STDOUT)
    finally:
        out.close()


def read_trace(path: Path) -> list[tuple[float, str, int, int]]:
    """``(time, point, iteration, count)`` per line (a torn last line is ignored)."""
    rows = []
    for line in (path.read_text().splitlines() if path.exists() else []):
        parts = line.split()
        if len(parts) == 4:
            rows.append((float(parts[0]), parts[1], int(parts[2]), int(parts[3])))
    return rows


def checkpoint_iteration(run_dir: Path) -> int | None:
    """The iteration of ``checkpoint.pt`` in ``run_dir`` (None: no checkpoint)."""
    import torch

    path = run_dir / "checkpoint.pt"
    return int(torch.load(path, weights_only=True)["iteration"]) if path.exists() else None


def metrics_rows(run_dir: Path) -> list[dict]:
    """The rows of ``metrics.jsonl`` (a torn last line is dropped)."""
    path, rows = run_dir / "metrics.jsonl", []
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def draw_plan(n_kills: int, iterations: int, rng: random.Random) -> list[dict]:
    """``n_kills`` planned kills: phase (see FIRST, CYCLE), iteration, and the uniform draws that place the kill
    inside the phase; in the order the run meets them."""
    phases = [*FIRST, *(CYCLE[j % len(CYCLE)] for j in range(max(0, n_kills - len(FIRST))))][:n_kills]
    plan = []
    for phase in phases:
        k = rng.randint(1, iterations)
        iteration = {"python": 0, "startup": 0, "setup": 0, "evaluation": iterations, "final_files": iterations}.get(
            phase, k)
        rank = {"setup": -1, "evaluation": iterations + 1, "final_files": iterations + 2}.get(phase, k)
        plan.append({"phase": phase, "iteration": iteration, "rank": rank, "chunk": rng.randint(1, CHUNKS),
                     "u_delay": rng.uniform(0.05, 0.95)})
    return sorted(plan, key=lambda p: (p["rank"], CYCLE.index(p["phase"]) if p["phase"] in CYCLE else -1))


def phase_duration(trace: list[tuple], spawn: float, phase: str, iteration: int) -> float:
    """The reference's time in ``phase`` at ``iteration``: from its first point to the next traced point (or to
    the phase's end point)."""
    first, last = BOUNDS[phase]
    if first is None:
        return next(t for t, p, _, _ in trace if p == last) - spawn
    i = next(i for i, (_, p, it, _) in enumerate(trace) if p == first and it == iteration)
    end = next((t for t, p, _, _ in trace[i + 1:] if last is None or p == last), trace[i][0])
    return end - trace[i][0]


def fault_for(target: dict, trace: list[tuple], spawn: float) -> tuple[str | None, float]:
    """``(IIF_FAULT, delay)`` of a planned kill (``python``: no fault point, the delay is this script's)."""
    phase, k = target["phase"], target["iteration"]
    if phase == "checkpoint":
        return f"checkpoint_chunk@{k}:{target['chunk']}", 0.0
    delay = round(target["u_delay"] * phase_duration(trace, spawn, phase, k), 4)
    if phase == "python":
        return None, delay
    return f"{BOUNDS[phase][0]}@{k}+{delay:.4f}", delay


def kill_once(run_dir: Path, trace: Path, overrides: list[str], fault: str | None, delay: float,
              output: Path) -> dict:
    """Start the run with ``fault`` (or, without, SIGKILL it ``delay`` seconds after the spawn); return where the
    kill landed (the last traced point before it)."""
    spawn = time.monotonic()
    proc = start(run_dir, trace, overrides, fault=fault, output=output)
    try:
        if fault is None:
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
        returncode = proc.wait(timeout=600)
    finally:  # never leave a child running (also when this script is interrupted)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    t_dead = time.monotonic()
    if returncode != -signal.SIGKILL:
        return {"killed": False, "returncode": returncode}
    lines = [r for r in read_trace(trace) if r[0] >= spawn]
    t, point, iteration, count = lines[-1] if lines else (spawn, "python", 0, 0)
    return {"killed": True, "landed": {"point": point, "iteration": iteration, "count": count,
                                       "after_point_s": round(t_dead - t, 4)}}


def compare(reference: Path, killed: Path) -> dict:
    """Final metrics, metrics rows and samples of the two runs."""
    import torch

    ref, got = (json.loads((d / "metrics.json").read_text()) for d in (reference, killed))
    fields = sorted((set(ref) | set(got)) - set(NOT_COMPARED))
    differing = {k: [ref.get(k), got.get(k)] for k in fields if ref.get(k) != got.get(k)}
    ref_rows, rows = metrics_rows(reference), metrics_rows(killed)
    strip = lambda r: {k: v for k, v in r.items() if k != "wall_s"}  # noqa: E731
    iterations = [r["iteration"] for r in rows]
    samples_equal = torch.equal(*(torch.load(d / "samples.pt", weights_only=True) for d in (reference, killed)))
    return {
        "metrics_identical": not differing, "differing_fields": differing,
        "reported": {k: {"reference": ref.get(k), "killed": got.get(k)} for k in REPORTED},
        "rows_each_iteration_once": iterations == list(range(1, ref["iterations"] + 1)),
        "row_iterations": iterations,
        "rows_identical": [strip(r) for r in rows] == [strip(r) for r in ref_rows],
        "samples_identical": samples_equal,
    }


def parent_main(args) -> int:
    overrides = [*RUN, *args.overrides]
    work = Path(args.workdir)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    plan_seed = args.plan_seed if args.plan_seed is not None else int.from_bytes(os.urandom(4), "little")
    t_start = time.perf_counter()

    # 1. the uninterrupted reference
    spawn = time.monotonic()
    proc = start(work / "reference", work / "reference.trace", overrides, output=work / "reference.out")
    if proc.wait() != 0:
        raise SystemExit(f"kill_test: error: the reference run failed ({proc.returncode}); see {work}/reference.out")
    reference_s = time.perf_counter() - t_start
    ref_trace = read_trace(work / "reference.trace")
    iterations = json.loads((work / "reference" / "metrics.json").read_text())["iterations"]

    # 2. the killed run
    run_dir, plan = work / "killed", draw_plan(args.kills, iterations, random.Random(plan_seed))
    kills, launches = [], 0
    for j, target in enumerate(plan, start=1):
        ckpt = checkpoint_iteration(run_dir)
        target = dict(target, planned=f"{target['phase']}@{target['iteration']}")
        if ckpt is not None and (target["phase"] == "setup" or (target["phase"] in IN_LOOP
                                                                 and target["iteration"] <= ckpt)):
            # the run is checkpointed past it: a step of the next iteration, or the final evaluation
            target.update(phase="step", iteration=ckpt + 1) if ckpt < iterations else target.update(
                phase="evaluation", iteration=iterations)
        fault, delay = fault_for(target, ref_trace, spawn)
        launches += 1
        rec = kill_once(run_dir, work / "killed.trace", overrides, fault, delay, work / f"killed-{launches:02d}.out")
        if not rec["killed"]:
            kills.append({"kill": j, "planned": target["planned"], "fault": fault,
                          "missed": "the run ended before the kill", "returncode": rec["returncode"]})
            if rec["returncode"] == 0:
                break
            continue
        after = checkpoint_iteration(run_dir)
        rows = [r["iteration"] for r in metrics_rows(run_dir)]
        kills.append({
            "kill": j, "planned": target["planned"], "fault": fault or f"SIGKILL after {delay} s", **rec["landed"],
            "checkpoint_before": ckpt, "checkpoint_after": after, "metrics_rows_after": rows,
            "rows_beyond_checkpoint": sum(1 for i in rows if after is None or i > after),
            "temp_files": sorted(p.name for p in run_dir.glob(".*.tmp")),
        })
        landed = rec["landed"]
        print(f"kill {j:2d}: planned {target['planned']:<14} fault {kills[-1]['fault']:<26} landed after "
              f"{landed['point']}@{landed['iteration']}:{landed['count']:<3} (+{landed['after_point_s']:.3f} s); "
              f"checkpoint {ckpt} -> {after}, rows {rows}", flush=True)
    # 3. let it finish
    launches += 1
    proc = start(run_dir, work / "killed.trace", overrides, output=work / f"killed-{launches:02d}.out")
    finished = proc.wait() == 0
    verdict = compare(work / "reference", run_dir) if finished else {"metrics_identical": False}
    landed: dict[str, int] = {}
    for k in kills:
        if "point" in k:
            landed[k["point"]] = landed.get(k["point"], 0) + 1
    result = {
        "command": "python -m iif.train " + " ".join(overrides), "plan_seed": plan_seed,
        "kills": sum(1 for k in kills if "point" in k), "launches": launches, "finished": finished,
        "landed_after": landed,
        "before_first_checkpoint": sum(1 for k in kills if "point" in k and k["checkpoint_before"] is None),
        "kills_with_rows_beyond_checkpoint": sum(1 for k in kills if k.get("rows_beyond_checkpoint")),
        "kills_leaving_temp_files": sum(1 for k in kills if k.get("temp_files")),
        "temp_files_at_end": sorted(p.name for p in run_dir.glob(".*.tmp")),
        "identical": bool(finished and verdict["metrics_identical"] and verdict["rows_each_iteration_once"]
                          and verdict["rows_identical"] and verdict["samples_identical"]),
        **verdict, "reference_s": round(reference_s, 1), "runtime_s": round(time.perf_counter() - t_start, 1),
        "kill_log": kills, "workdir": str(work),
    }
    if result["identical"] and not args.keep:  # finished run directories under outputs/ would show up in iif-table
        shutil.rmtree(work)
        result["workdir"] = None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{result['kills']} kills, {launches} launches; landed after: "
          + ", ".join(f"{p} {n}" for p, n in sorted(landed.items()))
          + f"; {result['before_first_checkpoint']} before the first checkpoint, "
          f"{result['kills_with_rows_beyond_checkpoint']} with metrics rows beyond the checkpoint, "
          f"{result['kills_leaving_temp_files']} leaving a temp file ({len(result['temp_files_at_end'])} at the end)")
    if finished:
        for k, v in verdict["reported"].items():
            print(f"  {k:<18} reference {v['reference']!r:<22} killed {v['killed']!r}")
        print(f"  metrics.jsonl iterations {verdict['row_iterations']}; rows identical: {verdict['rows_identical']}; "
              f"samples identical: {verdict['samples_identical']}")
    print(f"IDENTICAL: {result['identical']}  ({result['runtime_s']} s; wrote {out})")
    return 0 if result["identical"] else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=20, help="number of kills (default 20)")
    p.add_argument("--plan-seed", type=int, default=None, help="seed of the kill plan (default: random, recorded)")
    p.add_argument("--workdir", default=str(ROOT / "outputs" / "bench" / "kill_test"),
                   help="run directories and logs (emptied first; removed at the end if the runs are identical)")
    p.add_argument("--keep", action="store_true", help="keep --workdir also when the runs are identical")
    p.add_argument("--out", default=str(ROOT / "outputs" / "bench" / "kill_test.json"))
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for both runs (after --)")
    return parent_main(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
