"""Benchmark: one IIF run in 1 process against the same run across W processes (torchrun, gloo), measured in one
run of this script on the same cores.

    python scripts/bench_distributed.py                 # -> outputs/bench/distributed.json
    python scripts/bench_distributed.py --quick         # smaller run (seconds)
    python scripts/bench_distributed.py --nproc 4 --threads 1

Each configuration runs the same config (``method.n_samples`` and ``method.batch_size`` are the run's totals)
``--repeats`` times, alternating, in fresh processes. The single process gets ``--nproc x --threads`` torch threads,
each of the W processes ``--threads``, so both use the same cores. Read:

* ``speedup = train wall (1 process) / train wall (W processes)``, medians over repeats, from the runs'
  ``metrics.json`` ``wall_s`` (the method's own time: sampling, weights, rejection, regression; no start-up);
* ``max_rel_diff``: the largest relative difference of the final metrics between the two runs (the design says the
  result does not depend on the number of processes: float-summation noise, ~1e-9).

On a CPU the W processes share the machine's memory bandwidth and communicate through gloo (TCP on localhost), so
the speedup over intra-op threads is modest; the point of several processes is several GPUs, where each process
has its own.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sampling import machine_info  # noqa: E402

CONFIG = ["experiment=toy2d", "method=iif", "base_model=gmm_exact", "logger=none", "iterations=4",
          "method.n_samples=4096", "method.batch_size=2048", "method.grad_steps=50", "buffer.prefill=4096",
          "evaluation.n_samples=4000"]
QUICK = ["iterations=2", "method.n_samples=1024", "method.batch_size=512", "method.grad_steps=20",
         "buffer.prefill=1024", "sampler.n_steps=50"]
COMPARED = ["mode_tv", "energy_distance", "reward_mean", "sc_loss"]


def run(nproc: int, threads: int, overrides: list[str], workdir: Path) -> dict:
    run_dir = Path(tempfile.mkdtemp(dir=workdir, prefix=f"p{nproc}-"))
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m"]
                if nproc > 1 else [sys.executable, "-m"])
    env = {**os.environ, "WANDB_MODE": "offline", "CI": "1", "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([*launcher, "iif.train", *overrides, f"torch_threads={threads}",
                           f"hydra.run.dir={run_dir}"], env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"bench_distributed: the {nproc}-process run failed:\n{proc.stderr[-3000:]}")
    return json.loads((run_dir / "metrics.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nproc", type=int, default=2, help="processes of the distributed run (default 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process of the distributed run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="a smaller run")
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench")
    args = ap.parse_args()
    overrides = CONFIG + (QUICK if args.quick else [])
    args.out.mkdir(parents=True, exist_ok=True)
    walls: dict[int, list[float]] = {1: [], args.nproc: []}
    finals: dict[int, dict] = {}
    with tempfile.TemporaryDirectory() as work:
        for r in range(args.repeats):
            for nproc, threads in ((1, args.nproc * args.threads), (args.nproc, args.threads)):
                final = run(nproc, threads, overrides, Path(work))
                walls[nproc].append(final["wall_s"])
                finals[nproc] = final
                print(f"repeat {r}: {nproc} process(es) x {threads} thread(s): train wall {final['wall_s']:.2f} s")
    one, many = statistics.median(walls[1]), statistics.median(walls[args.nproc])
    diffs = {k: abs(finals[args.nproc][k] - finals[1][k]) / max(abs(finals[1][k]), 1e-12) for k in COMPARED}
    result = {
        "config": overrides, "nproc": args.nproc, "threads_per_process": args.threads, "repeats": args.repeats,
        "train_wall_s": {"1": walls[1], str(args.nproc): walls[args.nproc]},
        "median_train_wall_s": {"1": one, str(args.nproc): many}, "speedup": one / many,
        "spread": {str(n): (max(w) - min(w)) / statistics.median(w) for n, w in walls.items()},
        "max_rel_diff": max(diffs.values()), "rel_diff": diffs,
        "budget_equal": all(finals[1][k] == finals[args.nproc][k] for k in ("base_nfe", "reward_evals")),
        "machine": machine_info(),
    }
    name = "distributed_quick.json" if args.quick else "distributed.json"
    (args.out / name).write_text(json.dumps(result, indent=2) + "\n")
    print(f"1 process x {args.nproc * args.threads} threads: {one:.2f} s; {args.nproc} processes x {args.threads}: "
          f"{many:.2f} s; speedup {one / many:.2f}; final metrics max relative difference "
          f"{result['max_rel_diff']:.1e}; budget counts equal: {result['budget_equal']}")
    print(f"-> {args.out / name}")


if __name__ == "__main__":
    main()
