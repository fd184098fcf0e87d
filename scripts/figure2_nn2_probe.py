"""Probe of figure2's early blow-up (experiments/figure2/README.md, "What the numbers say"): run the first IIF
iterations of one figure2 run in-process, and after each evaluate the guidance at the test measurement twice (the
evaluator seeds its own draws, so both see the same noise): as trained, and with the learned ``s_2 MLP(t)`` of
``h = NN1 + NN2(t) grad r`` set to zero in the weights that sample (the EMA; with ``guidance.nn2_prior`` the
closed-form ``kappa(t)`` stays). Row 0 is the untrained guidance. Also prints ``NN2(t)`` on a grid of times, and the
sampled paths' median and largest norms.

    python scripts/figure2_nn2_probe.py --seed 0            # -> outputs/bench/figure2_nn2_probe_seed0.json
    python scripts/figure2_nn2_probe.py --seed 0 --iterations 0 -- guidance.nn2_prior=false   # the untrained h only

About 2 minutes an iteration on one core at ``--scale ci``. The overrides are the spec's (``experiments/figure2``).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from iif.build import build
from iif.config import compose
from iif.specs import load_spec, method_overrides, run_overrides
from iif.train import evaluate


def nn2_values(guidance, times: torch.Tensor) -> list[float]:
    """``NN2(t)`` of the guidance's current weights at ``times [T]``."""
    with torch.no_grad():
        return guidance.nn2_coefficient(times).flatten().tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", default="ci")
    parser.add_argument("--iterations", type=int, default=1, help="IIF iterations to probe (after each)")
    parser.add_argument("overrides", nargs="*", help="config overrides after the spec's, e.g. guidance.nn2_prior=false")
    args = parser.parse_args()
    spec = load_spec("figure2")
    cfg, _ = compose(["method=iif", f"seed={args.seed}", "logger=none", "torch_threads=1",
                      *run_overrides(spec, args.scale, method_overrides=method_overrides(spec, args.scale, "iif")),
                      *args.overrides])
    torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)
    comp = build(cfg, torch.device("cpu"))
    comp.prepare()
    method, guidance = comp.method, comp.method.guidance
    method.setup()
    times = torch.linspace(0.05, 0.95, 7)
    norms: list[tuple[float, float]] = []

    def record(mod, inputs, out):  # the median and largest norm of the states x_t the guidance sees
        norm = inputs[0].flatten(1).norm(dim=1)
        norms.append((norm.median().item(), norm.max().item()))

    rows = []
    for it in range(-1, args.iterations):
        if it >= 0:
            method.fit_step(it)
        norms.clear()
        hook = guidance.register_forward_hook(record)  # the evaluation's sampling only
        trained = evaluate(comp, cfg.seed).metrics
        hook.remove()
        with method.trainer.sampling_weights():
            nn2 = nn2_values(guidance, times)
        ema = method.trainer.ema if method.trainer.ema is not None else dict(guidance.named_parameters())
        saved = {k: v.detach().clone() for k, v in ema.items() if k.startswith("nn2.head")}
        with torch.no_grad():
            for k in saved:
                ema[k].zero_()
        zeroed = evaluate(comp, cfg.seed).metrics
        with torch.no_grad():
            for k, v in saved.items():
                ema[k].copy_(v)
        row = {"iteration": it + 1, "sc_loss": trained["sc_loss"], "consistency": trained["consistency"],
               "sc_loss_nn2_zero": zeroed["sc_loss"], "consistency_nn2_zero": zeroed["consistency"],
               "nn2": dict(zip([round(t, 3) for t in times.tolist()], nn2)),
               "path_norm_median_first_last": [norms[0][0], norms[-1][0]],
               "path_norm_max_first_last": [norms[0][1], norms[-1][1]]}
        print(json.dumps(row), flush=True)
        rows.append(row)
    out = Path("outputs/bench") / f"figure2_nn2_probe_seed{args.seed}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"seed": args.seed, "scale": args.scale, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
