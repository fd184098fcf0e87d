"""Where a finished run's path KL sits: the control cost of its guidance step by step.

The sampler accumulates each trajectory's control cost ``KL(P^h || P^0) = sum_k |delta_k|^2 / (2 c_k^2)``, with
``delta_k`` the guidance's shift of the base kernel's mean and ``c_k`` the kernel's standard deviation
(docs/methods.md §2). This script rebuilds a run from its directory (``.hydra/overrides.yaml`` and
``checkpoint.pt``, the weights it samples with), draws fresh trajectories with the run's sampler keeping every
state, and re-evaluates ``h`` at each kept state: the per-step terms, their share of the total and the mean norm of
``h`` (score units) per step. Their sum is the sampler's own ``control_cost`` (printed beside it as a check).

    python scripts/control_by_step.py outputs/table1/runs/single/iif_seed0      # -> <run>/control_by_step.json
    python scripts/control_by_step.py RUN --n 512 --seed 1

Read: experiments/table1/README.md ("Where the path KL goes"): at CI scale IIF's late path KL sits in the last
steps (``t <= 0.13``), where ``h`` grows to several times its size elsewhere.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import yaml

from iif.build import build
from iif.config import compose
from iif.methods.base import FineTuned


def control_by_step(method, n: int) -> dict:
    """Per-step control cost of ``method``'s guidance (its sampling weights) on ``n`` fresh unconditional or
    condition-drawn trajectories: ``{"steps": [{t, cost, share, h_norm}], "total", "sampler_control_cost"}``."""
    base, sampler, guidance = method.base, method.sampler, method.guidance
    with torch.no_grad(), method.trainer.sampling_weights():
        cond = method.conditions_for(n)
        traj = sampler.sample(base, guidance, n, cond=cond, keep_states=True)
        steps = []
        for i, k in enumerate(sampler.kernels(base)):
            if not (k.guided and k.std > 0):  # a deterministic or unguided step has no control cost
                continue
            x = traj.states[i]
            t = k.times(n, x.dtype, x.device)
            h = guidance(x, t, traj.x0_hats[i], traj.cond)
            cost = (k.shift(h).double().flatten(1) ** 2).sum(1) / (2 * k.std ** 2)
            steps.append({"t": float(k.t), "cost": cost.mean().item(),
                          "h_norm": h.flatten(1).norm(dim=1).mean().item()})
    total = sum(s["cost"] for s in steps)
    for s in steps:
        s["share"] = s["cost"] / total if total > 0 else 0.0
    return {"steps": steps, "total": total, "sampler_control_cost": traj.control_cost.mean().item()}


def load_run(run: Path, threads: int, parser: argparse.ArgumentParser):
    """The run's method with its checkpointed state (built from its own overrides, logger off); one error when the
    run's method trains no guidance (``base``, ``cg``, ``topk`` sample without an ``h`` of their own)."""
    overrides = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
    overrides = [o for o in overrides if not o.startswith("hydra.")] + ["logger=none", f"torch_threads={threads}"]
    cfg, choices = compose(overrides)
    comp = build(cfg, torch.device("cpu"))
    if not isinstance(comp.method, FineTuned):
        parser.error(f"{run}: method {choices.get('method')} trains no guidance h (the script reads runs of "
                     "fine-tuning methods: iif, reward_only, vargrad, pathwise, dpok, am, ...)")
    comp.prepare()
    comp.method.load_state_dict(torch.load(run / "checkpoint.pt", weights_only=False, map_location="cpu")["state"])
    return comp.method


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished run's directory (holds .hydra/ and checkpoint.pt)")
    parser.add_argument("--n", type=int, default=256, help="trajectories")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    for needed in (args.run / ".hydra" / "overrides.yaml", args.run / "checkpoint.pt"):
        if not needed.exists():
            parser.error(f"{needed} does not exist: give the directory of a finished iif-train run")
    torch.set_num_threads(args.threads)
    method = load_run(args.run, args.threads, parser)
    torch.manual_seed(args.seed)
    result = {"run": str(args.run), "n": args.n, "seed": args.seed, **control_by_step(method, args.n)}
    print(f"{args.run}: path KL {result['total']:.3f} "
          f"(the sampler's control cost {result['sampler_control_cost']:.3f})")
    print(f"{'t':>7} {'cost':>8} {'share':>6} {'|h|':>8}")
    for s in result["steps"]:
        print(f"{s['t']:7.3f} {s['cost']:8.4f} {s['share']:6.1%} {s['h_norm']:8.3f}")
    out = args.run / "control_by_step.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
