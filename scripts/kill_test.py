"""Kill test: a toy run is killed with SIGKILL at random moments and restarted in the same run directory until it
finishes; its final metrics must equal those of an uninterrupted run with the same seed.

    python scripts/kill_test.py                          # 20 kills -> outputs/bench/kill_test.json
    python scripts/kill_test.py --kills 5 --plan-seed 1  # replay a plan (the JSON records its seed)
    python scripts/kill_test.py -- method=reward_only    # extra overrides for both runs

1. Reference: ``python -m iif.train`` with :data:`RUN` (the toy, analytic base, IIF, ``debug=fast``, 8 iterations,
   a checkpoint every iteration, no logger, seed 0) and the extra overrides, uninterrupted.
2. Killed: the same command in a second run directory, killed at each planned moment and started again in the
   same directory (as a SLURM requeue would) until it finishes.
3. Verdict: ``metrics.json`` of both runs equal in every field except ``wall_s`` and ``peak_mem_mb`` (the brief's
   ``mode_tv``, ``energy_distance``, ``reward_mean``, ``sc_loss`` and the budget counts are listed one by one);
   ``metrics.jsonl`` of the killed run holds each iteration exactly once and every row equals the reference's
   (``wall_s`` aside); ``samples.pt`` equal. Written to ``outputs/bench/kill_test.json`` and printed.

Where kills land. Every run is started through this script's child mode (hidden flag ``--_child``), which runs
``iif-train``'s own entry function unchanged (``iif.train._hydra_main``, given the config folder by its absolute
path) but wraps some of its functions from outside (the components ``iif.train.build``
returns, ``save_checkpoint``, ``load_checkpoint``, ``evaluate``, ``atomic_write_text`` and ``torch.save``) so that
every phase boundary and every unit of work (a *tick*: a base-network call, an optimiser step, a checkpoint chunk,
an atomic text write such as ``metrics.json``) appends one line
``<monotonic time> <phase> <iteration> <tick>`` to a phase log with an unbuffered ``os.write``, so the log is
complete up to the moment of death. The phases:

======================  =================================================================================
``python``              interpreter start and imports (no line written yet)
``startup``             Hydra compose, build, reading the checkpoint
``setup``               fresh run only: the method's set-up; its sampling (buffer prefill) is ``sampling`` at
                        iteration 0, before the first checkpoint exists
``sampling``            the method step's sampling of N trajectories (iteration k = 1..K)
``training``            the rest of the method step: weights, rejection, buffer, gradient steps
``loop``                the metrics row, the logger, the loop between step and checkpoint
``checkpoint``          writing ``checkpoint.pt`` (temp file, fsync, rename)
``evaluation``          the final evaluation (its sampling included)
``final_files``         ``samples.pt``, the figure, then ``metrics.json`` (tick 1)
``exit``                the run is complete; the process exits
======================  =================================================================================

The plan: the first kill falls in the buffer prefill of the first start (before any checkpoint), then one each in
a checkpoint write, sampling, training, the final evaluation, the final files, start-up and Python's start, then
sampling, training and checkpoint writing in turn; each gets a random iteration (sorted, so the run moves on). The
parent watches the phase log, waits for that phase's entry and then for a random one of its ticks, sleeps a random
part of the reference run's time to the next tick and sends SIGKILL (:func:`kill_once`). Where the kill actually
landed is read back from the log (its last line), with the checkpoint on disk, the ``metrics.jsonl`` rows and the
temp files after the kill.

A checkpoint of this toy is written in a few milliseconds; so that a timed kill can land inside the write, the
child writes the checkpoint's bytes in 16 flushed chunks spread over ``--checkpoint-write-s`` seconds (default
0.2; the bytes are the same; 0 writes at full speed). ``--_die-at PHASE@ITERATION#TICK`` makes the child kill
itself with SIGKILL at an exact tick instead (the tests use it: ``checkpoint@3#8`` = after 8 of the 16 chunks of
the checkpoint of iteration 3; ``sampling@5#10`` = at the 10th base-network call of iteration 5's sampling).
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import shutil
import signal
import statistics
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
CHUNKS = 16
# the kills of a plan, first ones first (see the module docstring); then CYCLE in turn
FIRST = ("setup", "checkpoint", "sampling", "training", "evaluation", "final_files", "startup", "python")
CYCLE = ("sampling", "training", "checkpoint")
# where a planned phase is entered: (phase in the log, iteration) given a random iteration k and the run length K
ENTRY = {"setup": lambda k, K: ("sampling", 0), "python": lambda k, K: ("python", k),
         "startup": lambda k, K: ("startup", 0), "sampling": lambda k, K: ("sampling", k),
         "training": lambda k, K: ("training", k), "checkpoint": lambda k, K: ("checkpoint", k),
         "evaluation": lambda k, K: ("evaluation", K), "final_files": lambda k, K: ("final_files", K)}
# phases a resumed run reaches only before/after its loop: their iteration is not "the next one to run"
OUTSIDE_LOOP = ("python", "startup", "evaluation", "final_files")


# ============================================================================================== child side
class Probe:
    """Appends ``<time> <phase> <iteration> <tick>`` lines to the phase log; optionally SIGKILLs its own process at
    one ``(phase, iteration, tick)``."""

    def __init__(self, log_path: str, die_at: tuple[str, int, int] | None):
        self.fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.phase, self.iteration, self.tick, self.die_at = "python", 0, 0, die_at
        self.latest = 0  # the latest iteration known (the checkpoint's, on resume): the label of the next entry

    def enter(self, phase: str, iteration: int | None = None) -> None:
        """A phase starts; its lines carry ``iteration`` (default: the latest known) until the next entry."""
        if iteration is not None:
            self.latest = iteration
        self.phase, self.iteration, self.tick = phase, self.latest, 0
        self._mark()

    def step(self) -> None:
        self.tick += 1
        self._mark()

    def _mark(self) -> None:
        os.write(self.fd, f"{time.monotonic():.6f} {self.phase} {self.iteration} {self.tick}\n".encode())
        if (self.phase, self.iteration, self.tick) == self.die_at:
            os.kill(os.getpid(), signal.SIGKILL)


def _wrap(obj, name: str, before=None, after=None) -> None:
    """Replace ``obj.name`` by a function that calls ``before(*args)``, the original, then ``after(result)``."""
    original = getattr(obj, name)

    def wrapped(*args, **kwargs):
        if before:
            before(*args, **kwargs)
        out = original(*args, **kwargs)
        if after:
            after(out)
        return out

    setattr(obj, name, wrapped)


def install_probes(probe: Probe, checkpoint_write_s: float) -> None:
    """Instrument ``iif.train`` from outside (its source is unchanged)."""
    import torch

    import iif.train as train_mod

    def instrument(comp):
        method = comp.method
        _wrap(method, "setup", before=lambda: probe.enter("setup", 0))
        _wrap(method, "fit_step", before=lambda it: probe.enter("training", it + 1),
              after=lambda _: probe.enter("loop"))
        _wrap(comp.base, "eps", before=lambda *a, **k: probe.step())
        if getattr(method, "trainer", None) is not None:
            _wrap(method.trainer, "minimise", before=lambda *a, **k: probe.step())
        for name in ("sample", "rsample"):
            if hasattr(method.sampler, name):
                _wrap_sampling(method.sampler, name)
        return comp

    def _wrap_sampling(sampler, name):
        original = getattr(sampler, name)

        def wrapped(*args, **kwargs):
            if probe.phase == "evaluation":  # the evaluation's sampling counts as evaluation
                return original(*args, **kwargs)
            outer = probe.phase
            probe.enter("sampling")
            out = original(*args, **kwargs)
            probe.enter(outer)
            return out

        setattr(sampler, name, wrapped)

    build, save_ckpt, load_ckpt, evaluate = (train_mod.build, train_mod.save_checkpoint, train_mod.load_checkpoint,
                                             train_mod.evaluate)
    train_mod.build = lambda *args, **kwargs: instrument(build(*args, **kwargs))
    _wrap(train_mod, "atomic_write_text", before=lambda *a, **k: probe.step())  # config.yaml, metrics.jsonl/json

    def save_checkpoint(run_dir, comp, iteration, *args, **kwargs):
        probe.enter("checkpoint", iteration)
        save_ckpt(run_dir, comp, iteration, *args, **kwargs)
        probe.enter("loop")

    def load_checkpoint(*args, **kwargs):
        ckpt = load_ckpt(*args, **kwargs)
        probe.latest = ckpt["iteration"]  # labels the phases after start-up (the final evaluation of a resumed run)
        return ckpt

    def evaluate_(*args, **kwargs):
        probe.enter("evaluation")
        out = evaluate(*args, **kwargs)
        probe.enter("final_files")
        return out

    train_mod.save_checkpoint, train_mod.load_checkpoint = save_checkpoint, load_checkpoint
    train_mod.evaluate = evaluate_

    torch_save = torch.save

    def chunked_save(obj, f, *args, **kwargs):
        """During a checkpoint: the same bytes, written in CHUNKS flushed pieces (a tick after each)."""
        if probe.phase != "checkpoint" or not hasattr(f, "write"):
            return torch_save(obj, f, *args, **kwargs)
        buf = io.BytesIO()
        torch_save(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        size = math.ceil(len(data) / CHUNKS)
        for k in range(CHUNKS):
            f.write(data[k * size:(k + 1) * size])
            f.flush()
            probe.step()
            time.sleep(checkpoint_write_s / CHUNKS)

    torch.save = chunked_save


def child_main(args) -> None:
    """Run ``iif-train`` in ``args._child`` with the probes installed."""
    die_at = None
    if args._die_at:
        phase, rest = args._die_at.split("@")
        iteration, tick = rest.split("#")
        die_at = (phase, int(iteration), int(tick))
    probe = Probe(args._phase_log, die_at)
    install_probes(probe, args.checkpoint_write_s)
    probe.enter("startup")
    sys.argv = ["iif-train", *args.overrides, f"hydra.run.dir={args._child}"]
    import hydra

    import iif.train as train_mod

    # iif.train's own Hydra entry, with the config folder given as an absolute path: `@hydra.main(config_path=
    # "../conf")` resolves only when iif/train.py runs as __main__ (`python -m iif.train`), not when imported.
    hydra.main(version_base="1.3", config_path=str(train_mod.CONF_DIR), config_name="config")(
        train_mod._hydra_main.__wrapped__)()
    probe.enter("exit")


# ============================================================================================== parent side
def child_env() -> dict:
    return {**os.environ, "CI": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}


def start(run_dir: Path, phase_log: Path, overrides: list[str], *, die_at: str | None = None,
          checkpoint_write_s: float = 0.0, output: Path | None = None) -> subprocess.Popen:
    """Start the run in ``run_dir`` as a child process that logs its phases to ``phase_log``."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", str(run_dir), "--_phase-log", str(phase_log),
           "--checkpoint-write-s", str(checkpoint_write_s)]
    if die_at:
        cmd += ["--_die-at", die_at]
    out = open(output or os.devnull, "ab")
    try:
        return subprocess.Popen([*cmd, "--", *overrides], cwd=ROOT, env=child_env(), stdout=out,
                                stderr=subprocess.STDOUT)
    finally:
        out.close()


def read_phase_log(path: Path) -> list[tuple[float, str, int, int]]:
    """``(time, phase, iteration, tick)`` per line (a torn last line is ignored)."""
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 4:
                rows.append((float(parts[0]), parts[1], int(parts[2]), int(parts[3])))
    return rows


def entries(log: list[tuple]) -> list[dict]:
    """Each phase entry (a tick-0 line): phase, iteration, ``k`` (the how-many-th entry of that phase and iteration;
    a method step enters ``training`` twice, around its sampling), ``marks`` (times of the entry and its ticks) and
    ``end`` (the next entry)."""
    out, counts = [], {}
    for t, phase, iteration, tick in log:
        if tick == 0:
            if out:
                out[-1]["end"] = t
            counts[(phase, iteration)] = counts.get((phase, iteration), 0) + 1
            out.append({"phase": phase, "iteration": iteration, "k": counts[(phase, iteration)], "marks": [t],
                        "end": t})
        elif out:
            out[-1]["marks"].append(t)
            out[-1]["end"] = t
    return out


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
    """``n_kills`` planned kills: phase (see FIRST, CYCLE) and a random iteration, in the order the run meets
    them."""
    phases = [*FIRST, *(CYCLE[j % len(CYCLE)] for j in range(max(0, n_kills - len(FIRST))))][:n_kills]
    plan = []
    for phase in phases:
        k = rng.randint(1, iterations)
        entry_phase, entry_it = ENTRY[phase](k, iterations)
        rank = {"setup": -1, "evaluation": iterations + 1, "final_files": iterations + 2}.get(phase, k)
        plan.append({"phase": phase, "entry": entry_phase, "iteration": entry_it, "rank": rank,
                     "u_tick": rng.random(), "u_delay": rng.uniform(0.05, 0.95)})
    return sorted(plan, key=lambda p: (p["rank"], CYCLE.index(p["phase"]) if p["phase"] in CYCLE else -1))


def reference_phases(log: list[tuple], spawn: float) -> dict:
    """``{(phase, iteration): entry}`` (see :func:`entries`): the longest entry of each phase and iteration in the
    reference run, and ``("python", 0)``: from the spawn to the first line (``k = 0``)."""
    out = {("python", 0): {"k": 0, "marks": [spawn], "end": log[0][0]}}
    for e in entries(log):
        key = (e["phase"], e["iteration"])
        if key not in out or e["end"] - e["marks"][0] > out[key]["end"] - out[key]["marks"][0]:
            out[key] = e
    return out


def kill_once(run_dir: Path, phase_log: Path, overrides: list[str], target: dict, reference: dict,
              checkpoint_write_s: float, output: Path) -> dict:
    """Start the run, wait for the target phase's entry and then for its tick ``j``, sleep a delay, SIGKILL;
    return where it landed.

    ``j`` is drawn uniformly over the entry and the ticks the phase had in the reference run, the delay uniformly
    over 5-95 % of the reference's time from that tick to the next (at most 3 median tick gaps, so that one slow
    moment of the reference does not carry the kill past the phase): a random moment spread over the whole phase,
    robust to the phase running at another speed than in the reference.
    """
    key = ("python", 0) if target["entry"] == "python" else (target["entry"], target["iteration"])
    ref = reference[key]
    k, marks = ref["k"], ref["marks"]
    gaps = [b - a for a, b in zip(marks, [*marks[1:], ref["end"]])]
    j = min(int(target["u_tick"] * len(marks)), len(marks) - 1)
    offset = target["u_delay"] * min(gaps[j], 3 * statistics.median(gaps))
    phase_log.touch()
    pos = phase_log.stat().st_size  # earlier launches' lines are not this one's
    spawn = time.monotonic()
    proc = start(run_dir, phase_log, overrides, checkpoint_write_s=checkpoint_write_s, output=output)
    t_entry, seen = (spawn if k == 0 else None), 0
    try:
        while t_entry is None and proc.poll() is None:
            with open(phase_log) as f:
                f.seek(pos)
                chunk = f.read()
            complete = chunk[: chunk.rfind("\n") + 1]
            pos += len(complete.encode())
            for line in complete.splitlines():
                t, phase, it, tick = line.split()
                if (phase, int(it)) != key:
                    continue
                seen += int(tick) == 0
                if seen == k and int(tick) == j:
                    t_entry = float(t)
                    break
            time.sleep(0.0005)
        if t_entry is None:  # the run finished (or failed) before the target phase
            return {"killed": False, "returncode": proc.wait()}
        time.sleep(max(0.0, t_entry + offset - time.monotonic()))
        t_kill = time.monotonic()
    finally:  # never leave a child running (also when this script is interrupted)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
    log = [r for r in read_phase_log(phase_log) if r[0] >= spawn]
    last = log[-1] if log else (spawn, "python", 0, 0)
    phase_start = max((r[0] for r in log if r[1] == last[1] and r[3] == 0), default=spawn)
    return {"killed": True, "returncode": proc.returncode, "trigger": f"{key[0]}@{key[1]}#{j}+{offset:.3f}s",
            "landed": {"phase": last[1], "iteration": last[2], "tick": last[3],
                       "into_phase_s": round(t_kill - phase_start, 4)}}


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
    proc = start(work / "reference", work / "reference.phases", overrides,
                 checkpoint_write_s=args.checkpoint_write_s, output=work / "reference.out")
    if proc.wait() != 0:
        raise SystemExit(f"kill_test: error: the reference run failed ({proc.returncode}); see {work}/reference.out")
    reference_s = time.perf_counter() - t_start
    ref_log = read_phase_log(work / "reference.phases")
    reference = reference_phases(ref_log, spawn)
    iterations = json.loads((work / "reference" / "metrics.json").read_text())["iterations"]

    # 2. the killed run
    run_dir, plan = work / "killed", draw_plan(args.kills, iterations, random.Random(plan_seed))
    kills, launches = [], 0
    for j, target in enumerate(plan, start=1):
        ckpt = checkpoint_iteration(run_dir)
        target = dict(target, planned=f"{target['phase']}@{target['iteration']}")
        if target["entry"] not in OUTSIDE_LOOP and ckpt is not None and target["iteration"] <= ckpt:
            # the run is checkpointed past it: the same phase of the next iteration, or the final evaluation
            next_it = ckpt + 1
            target.update(iteration=next_it) if next_it <= iterations else target.update(entry="evaluation",
                                                                                           iteration=iterations)
        launches += 1
        rec = kill_once(run_dir, work / "killed.phases", overrides, target, reference, args.checkpoint_write_s,
                        work / f"killed-{launches:02d}.out")
        if not rec["killed"]:
            kills.append({"kill": j, "planned": target["planned"], "missed": "the run finished before the target",
                          "returncode": rec["returncode"]})
            break
        after = checkpoint_iteration(run_dir)
        rows = [r["iteration"] for r in metrics_rows(run_dir)]
        kills.append({
            "kill": j, "planned": target["planned"], "trigger": rec["trigger"], **rec["landed"],
            "checkpoint_before": ckpt, "checkpoint_after": after,
            "metrics_rows_after": rows,
            "rows_beyond_checkpoint": sum(1 for i in rows if after is None or i > after),
            "temp_files": sorted(p.name for p in run_dir.glob(".*.tmp")),
        })
        print(f"kill {j:2d}: planned {target['planned']:<14} trigger {rec['trigger']:<24} "
              f"landed in {rec['landed']['phase']:<11} "
              f"iteration {rec['landed']['iteration']} tick {rec['landed']['tick']:<3} "
              f"(+{rec['landed']['into_phase_s']:.3f} s); checkpoint {ckpt} -> {after}, rows {rows}", flush=True)
    # 3. let it finish
    launches += 1
    proc = start(run_dir, work / "killed.phases", overrides, checkpoint_write_s=args.checkpoint_write_s,
                 output=work / f"killed-{launches:02d}.out")
    finished = proc.wait() == 0
    verdict = compare(work / "reference", run_dir) if finished else {"metrics_identical": False}
    landed: dict[str, int] = {}
    for k in kills:
        if "phase" in k:
            landed[k["phase"]] = landed.get(k["phase"], 0) + 1
    result = {
        "command": "python -m iif.train " + " ".join(overrides), "plan_seed": plan_seed,
        "checkpoint_write_s": args.checkpoint_write_s, "kills": sum(1 for k in kills if "phase" in k),
        "launches": launches, "finished": finished,
        "landed": landed,
        "before_first_checkpoint": sum(1 for k in kills if "phase" in k and k["checkpoint_before"] is None),
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
    print(f"\n{result['kills']} kills, {launches} launches; landed: "
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
    p.add_argument("--checkpoint-write-s", type=float, default=0.2,
                   help="spread each checkpoint write over this many seconds (default 0.2; 0: full speed)")
    p.add_argument("--workdir", default=str(ROOT / "outputs" / "bench" / "kill_test"),
                   help="run directories and logs (emptied first; removed at the end if the runs are identical)")
    p.add_argument("--keep", action="store_true", help="keep --workdir also when the runs are identical")
    p.add_argument("--out", default=str(ROOT / "outputs" / "bench" / "kill_test.json"))
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_phase-log", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_die-at", default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for both runs (after --)")
    args = p.parse_args(argv)
    if args._child:
        child_main(args)
        return 0
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
