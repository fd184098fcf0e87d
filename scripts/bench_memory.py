"""Benchmark: peak memory and wall time of ONE training iteration of each method as the number of sampling steps
grows, measured in one run of this script (CPU).

    python scripts/bench_memory.py                      # -> outputs/bench/memory_vs_steps.{json,png}
    python scripts/bench_memory.py --quick              # steps 10, 20, 40; seconds  -> memory_vs_steps_quick.*
    python scripts/bench_memory.py --methods am pathwise --steps 25 100 400

Every (method, steps) pair runs in a fresh subprocess (this script, hidden flag ``--_child``), so one
measurement's allocations cannot hide another's: the components are built from the default config with
``base_model=gmm_exact`` (analytic base: the memory measured is the method's, not a large network's) and the
common sizes below (one optimiser step on 256 trajectories, so methods are compared per update); ``setup()``
(IIF's buffer prefill) runs first, then the peak-RSS counter is reset (``/proc/self/clear_refs`` <- 5), two
iterations run (a warm-up and the timed one) and ``increase = VmHWM after - VmRSS before`` (MB, 2^20 bytes) is
the most memory an iteration added; the wall time is the second iteration's. (Measuring the peak after a
warm-up would hide it: memory freed by the allocator stays in the process.)

Read ``increase_ratio = increase(max steps) / increase(min steps)`` per method: ~1 is flat in the number of
steps, ~max/min is linear. What to expect, and why:

* ``iif``: flat. Sampling runs without a graph and keeps no states; the regression sees buffer samples only.
* ``dpok``: near flat. No graph through the chain; the transitions of the sampled trajectories (``O(N b D)``
  floats, kept in the FIFO) grow with ``N`` but are tiny next to network activations.
* ``vargrad``: near flat. Detached states are kept (``O(N b D)``) and the gradient of the variance is
  accumulated one step at a time, so only one step's graph of ``h`` is alive.
* ``am``: near flat. Detached states and adjoints (``O(N b D)``); one vector-Jacobian product per step whose
  graph is freed at once; ``h`` is differentiated at ``loss_steps`` steps only.
* ``pathwise``: linear. The graph of every step (guidance, base network, reward-informed features) is kept for
  the backward pass through the whole chain.
"""
from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sampling import build_components, machine_info, proc_status_kb, reset_peak_rss  # noqa: E402

METHODS = ["iif", "pathwise", "vargrad", "dpok", "am"]
STEPS = [25, 50, 100, 200, 400, 1000]
QUICK_STEPS = [10, 20, 40]
B = 256
SIZES = {  # one optimiser step on B trajectories (IIF: B trajectories, one regression step of batch B)
    "iif": [f"method.n_samples={B}", "method.grad_steps=1", f"method.batch_size={B}", "buffer.prefill=256"],
    "pathwise": [f"method.batch_size={B}", "method.grad_steps=1"],
    "vargrad": [f"method.batch_size={B}", "method.grad_steps=1"],
    "dpok": [f"method.n_samples={B}", "method.grad_steps=1", f"method.batch_size={B}", "method.value_steps=1",
             f"method.value_batch_size={B}"],
    "am": [f"method.batch_size={B}", "method.grad_steps=1"],
}


def child(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    overrides = ["base_model=gmm_exact", f"method={spec['method']}", f"sampler.n_steps={spec['steps']}",
                 "logger=none", *SIZES[spec["method"]]]
    if spec["method"] == "am":
        overrides.append(f"method.loss_steps={min(20, spec['steps'])}")
    cfg, comp = build_components(overrides)
    comp.prepare()
    comp.method.setup()
    gc.collect()
    peak_reset = reset_peak_rss()
    before = proc_status_kb()["VmRSS"] / 1024  # after setup: the buffer prefill is not part of an iteration
    comp.method.fit_step(0)  # warm-up (allocator pools, lazy initialisation); its peak counts: freed memory stays
    t0 = time.perf_counter()  # in the process, so a peak measured after it would hide the iteration's own
    comp.method.fit_step(1)
    wall = time.perf_counter() - t0
    peak = proc_status_kb()["VmHWM"] / 1024
    return {"method": spec["method"], "steps": spec["steps"], "rss_before_mb": before, "peak_mb": peak,
            "increase_mb": peak - before, "wall_s": wall, "peak_reset": peak_reset, "overrides": overrides}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = sorted((r for r in rows if r["method"] == method), key=lambda r: r["steps"])
        steps = [r["steps"] for r in rs]
        axes[0].plot(steps, [max(r["increase_mb"], 0.1) for r in rs], "o-", label=method)
        axes[1].plot(steps, [r["wall_s"] for r in rs], "o-", label=method)
    for ax, ylabel in zip(axes, ["peak RSS increase over one iteration (MB)", "wall time of one iteration (s)"]):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("sampling steps N")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"one optimiser step on {B} trajectories, gmm_exact base, CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--steps", nargs="+", type=int, default=None)
    p.add_argument("--quick", action="store_true", help=f"steps {QUICK_STEPS} (a smoke run)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per measurement (default 1)")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench")
    p.add_argument("--_child", dest="child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    steps = args.steps or (QUICK_STEPS if args.quick else STEPS)
    if min(steps) < 1:
        p.error("--steps must be >= 1")
    info = machine_info()
    rows = []
    for method in args.methods:
        for n in steps:
            spec = dict(method=method, steps=n, threads=args.threads)
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_child", json.dumps(spec)],
                                  capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                sys.exit(f"measurement {method} at {n} steps failed:\n{proc.stderr[-4000:]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{method:9s} N={n:5d}  increase {row['increase_mb']:9.1f} MB  peak {row['peak_mb']:8.1f} MB  "
                  f"wall {row['wall_s']:7.3f} s", flush=True)
    lo, hi = min(steps), max(steps)
    summary = {}
    for method in args.methods:
        by = {r["steps"]: r for r in rows if r["method"] == method}
        summary[method] = {
            "increase_ratio": by[hi]["increase_mb"] / max(by[lo]["increase_mb"], 1e-9),
            "wall_ratio": by[hi]["wall_s"] / by[lo]["wall_s"],
            "increase_mb_per_step": (by[hi]["increase_mb"] - by[lo]["increase_mb"]) / (hi - lo),
        }
    print(f"\nratios {hi} vs {lo} steps (steps ratio {hi / lo:.0f}):")
    for method, s in summary.items():
        print(f"  {method:9s} memory increase x{s['increase_ratio']:.2f} ({s['increase_mb_per_step']:.3f} MB/step)"
              f"   wall x{s['wall_ratio']:.1f}")
    info["loadavg_end"] = list(__import__("os").getloadavg())
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "memory_vs_steps_quick" if args.quick else "memory_vs_steps"
    (args.out / f"{stem}.json").write_text(json.dumps(
        {"rows": rows, "summary": summary, "steps": steps, "trajectories_per_step": B, "machine": info}, indent=2))
    plot(rows, args.out / f"{stem}.png")
    print(f"wrote {args.out / (stem + '.json')} and {stem}.png")


if __name__ == "__main__":
    main()
