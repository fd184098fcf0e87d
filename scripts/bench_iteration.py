"""Benchmark: the cost of one toy IIF iteration in this tree against another commit, measured in ONE run.

    python scripts/bench_iteration.py                 # against the parent commit's tree (git worktree)
    python scripts/bench_iteration.py --ref f9bbbcd   # against any commit
    python scripts/bench_iteration.py --quick         # seconds (smoke)

Both trees run the same snippet in their own subprocess (``cwd`` = the tree, so ``import iif`` resolves there): compose
figure1's IIF config (``experiment=toy2d method=iif base_model=gmm_exact``), build, ``method.setup()``, one warm-up
``fit_step``, then ``reps`` timed ``fit_step`` calls, each under ``torch.manual_seed(i)``. The two trees alternate
(AB, BA, AB, ...) so a slow drift of a shared machine hits both alike; each process runs with one torch thread.
Read ``ratio = median(this) / median(ref)``: the issue's goal is <= 1.05. The trees must compute the same thing
(checked: ``same_loss``, the logged losses of the timed iterations agree to 1e-4 relative).
Writes ``outputs/bench/iteration.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SNIPPET = r"""
import json, os, sys, time, torch
torch.set_num_threads(1)
# iif is a namespace package: the editable install adds this checkout's iif/ after the tree's own, so choose the
# module by what the tree (the working directory) holds, not by what imports
if os.path.exists("iif/build.py"):
    from iif.build import build
    from iif.config import compose
else:
    from iif.train import build, compose
cfg, _ = compose(["experiment=toy2d", "method=iif", "base_model=gmm_exact", "logger=none"] + sys.argv[2:])
torch.manual_seed(0)
comp = build(cfg)
comp.prepare()
comp.method.setup()
comp.method.fit_step(0)
times, losses = [], []
for i in range(int(sys.argv[1])):
    with torch.random.fork_rng():
        torch.manual_seed(i)
        t0 = time.perf_counter()
        row = comp.method.fit_step(1 + i)
        times.append(time.perf_counter() - t0)
    losses.append(row["loss"])
print(json.dumps({"times": times, "losses": losses}))
"""


def run(tree: Path, reps: int, overrides: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    out = subprocess.run([sys.executable, "-c", SNIPPET, str(reps), *overrides], cwd=tree, env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref", default="HEAD~1", help="commit to compare against (default: the parent commit)")
    ap.add_argument("--rounds", type=int, default=4, help="alternating rounds (each: one process per tree)")
    ap.add_argument("--reps", type=int, default=3, help="timed iterations per process")
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke test of the script)")
    args = ap.parse_args()
    overrides = ["method.n_samples=256", "method.grad_steps=5", "method.batch_size=128"] if args.quick else []
    rounds, reps = (2, 1) if args.quick else (args.rounds, args.reps)
    commit = subprocess.run(["git", "rev-parse", args.ref], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        ref_tree = Path(tmp) / "ref"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(ref_tree), commit], cwd=ROOT, check=True)
        try:
            this, ref = {"times": [], "losses": []}, {"times": [], "losses": []}
            for r in range(rounds):
                order = [(ROOT, this), (ref_tree, ref)] if r % 2 == 0 else [(ref_tree, ref), (ROOT, this)]
                for tree, acc in order:
                    res = run(tree, reps, overrides)
                    acc["times"] += res["times"]
                    acc["losses"] += res["losses"]
                print(f"round {r + 1}/{rounds}: this {statistics.median(this['times']):.3f} s, "
                      f"ref {statistics.median(ref['times']):.3f} s", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(ref_tree)], cwd=ROOT, check=False)
    ratio = statistics.median(this["times"]) / statistics.median(ref["times"])
    same = all(abs(a - b) <= 1e-4 * max(1.0, abs(b)) for a, b in zip(this["losses"], ref["losses"]))
    result = {"ref": commit, "this_s": this["times"], "ref_s": ref["times"], "ratio": ratio, "same_loss": same,
              "quick": args.quick, "overrides": overrides}
    out = ROOT / "outputs" / "bench" / ("iteration_quick.json" if args.quick else "iteration.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"one toy IIF iteration: this tree {statistics.median(this['times']):.3f} s, {commit[:7]} "
          f"{statistics.median(ref['times']):.3f} s, ratio {ratio:.3f} (goal <= 1.05); same losses: {same} -> {out}")


if __name__ == "__main__":
    main()
