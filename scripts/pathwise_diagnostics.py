"""Diagnostics of the pathwise stochastic-control gradient (``method=pathwise``), for its two path-KL estimators:
``analytic`` (``sum_t ||Delta_t||^2 / (2 sigma_t^2)``) and ``stl`` (sticking the landing, ``method.stl=true``).

    python scripts/pathwise_diagnostics.py grad [--run DIR] [--batch 2048]      # -> outputs/bench/pathwise_grad.json
    python scripts/pathwise_diagnostics.py warm --run DIR [--lr 1e-3] [--iterations 15] [--batch 256]
                                                                                # -> outputs/bench/pathwise_warm.json

``grad``: for one batch of trajectories at the guidance of ``--run`` (a run directory of any method with the same
guidance, e.g. an ``iif`` run; default: the zero control of a fresh run), the per-path gradient of the loss w.r.t.
the guidance output ``h(x_t, t)`` at every step, and per step: ``snr = |mean| / (||std|| / sqrt(n))`` of that
gradient, ``noise = ||std|| / sqrt(n)`` (the standard error of the batch mean), and ``top1_share``, the share of
its summed squared norm carried by the 1 % of paths with the largest norms (heavy tails: a few paths near the
separatrices between modes, where ``d x_0 / d x_t`` is large). Both estimators have the same expectation, so the
comparison is ``noise_ratio = noise(stl) / noise(analytic)`` per step, on the same trajectories (its square is
the variance ratio); it prints medians over steps. (``|mean|`` of one batch includes the noise, so ``snr`` is
biased upwards where it is near 1.)

``warm``: starts ``method=pathwise`` from the guidance of ``--run`` (EMA weights if it kept them) at a constant
``--lr``, and evaluates ``mode_tv`` and ``sc_loss`` every ``--every`` iterations, for each estimator, from the same
seed. Started at a good solution, it shows where the pathwise dynamics settle at that learning rate and batch.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from iif.build import build  # noqa: E402
from iif.config import compose  # noqa: E402

ESTIMATORS = {"analytic": False, "stl": True}


def components(run: Path | None, overrides: list[str]):
    """The pathwise components of the toy, with the guidance of ``run``'s checkpoint if given."""
    cfg, _ = compose(["experiment=toy2d", "method=pathwise", "logger=none", *overrides])
    comp = build(cfg)
    if run is not None:
        path = run / "checkpoint.pt"
        if not path.is_file():
            sys.exit(f"pathwise_diagnostics: {path} does not exist (pass a run directory of a trained method)")
        state = torch.load(path, weights_only=True, map_location="cpu")
        trainer = state.get("state", {}).get("trainer")
        if trainer is None:
            sys.exit(f"pathwise_diagnostics: {path} holds no trained guidance (method '{state.get('method')}')")
        # the trainer checkpoints the guidance's trainable parameters by name ("module"; "ema": their average)
        guidance = comp.method.guidance
        trainable = {name for name, p in guidance.named_parameters() if p.requires_grad}
        try:
            loaded = guidance.load_state_dict(trainer["ema"] or trainer["module"], strict=False)
            missing = sorted(trainable & set(loaded.missing_keys))
            if missing or loaded.unexpected_keys:
                raise RuntimeError(f"missing parameters {missing[:3]}, unexpected {sorted(loaded.unexpected_keys)[:3]}")
        except RuntimeError as e:
            sys.exit(f"pathwise_diagnostics: the guidance in {path} does not fit this config's (pass the run's "
                     f"overrides, e.g. guidance=mlp): {str(e).splitlines()[0]}")
    return comp


def output_grads(comp, n: int, stl: bool, seed: int) -> list[torch.Tensor]:
    """Per-path ``d loss_i / d h(x_t, t)`` for the guided steps (``t = N..1``, the sampler's kernels with
    ``guided``): a list of ``[n, *shape]``."""
    method = comp.method
    live: list[torch.Tensor] = []

    def keep(module, inputs, out):  # every guidance call; with stl the frozen-parameter call follows the live one
        if out.requires_grad:
            out.retain_grad()
        live.append(out)

    handle = method.guidance.register_forward_hook(keep)
    try:
        torch.manual_seed(seed)
        traj = method.sampler.rsample(method.base, method.guidance, n, stl=stl)
    finally:
        handle.remove()
    kl = traj.stl_log_ratio if stl else traj.control_cost
    loss = (kl.float() - method.reward.log_tilt_autograd(traj.x0)).sum()  # sum: per-path gradients
    loss.backward()
    outs = live[0::2] if stl else live
    assert len(outs) == sum(k.guided for k in method.sampler.kernels(method.base))
    return [o.grad.detach().clone() for o in outs]


def grad_stats(args) -> dict:
    comp = components(args.run, args.overrides)
    times = [k.t for k in comp.method.sampler.kernels(comp.base) if k.guided]
    per = {}
    for name, stl in ESTIMATORS.items():
        rows = []
        for t, g in zip(times, output_grads(comp, args.batch, stl, args.seed)):
            g = g.flatten(1)
            sq = g.pow(2).sum(1)
            top = sq.sort(descending=True).values[: max(1, len(sq) // 100)]
            noise = g.std(0).norm() / len(g) ** 0.5
            rows.append({"t": t, "mean_norm": g.mean(0).norm().item(), "noise": noise.item(),
                         "snr": (g.mean(0).norm() / noise).item(),
                         "top1_share": (top.sum() / sq.sum()).item(),
                         "max_over_median": (sq.max().sqrt() / sq.median().sqrt()).item()})
        per[name] = rows
    ratio = [s["noise"] / a["noise"] for s, a in zip(per["stl"], per["analytic"])]
    summary = {name: {"median_snr": statistics.median(r["snr"] for r in rows),
                      "median_top1_share": statistics.median(r["top1_share"] for r in rows)}
               for name, rows in per.items()}
    summary["median_noise_ratio_stl_over_analytic"] = statistics.median(ratio)
    for name in ESTIMATORS:
        print(f"{name:9s} median over steps: snr {summary[name]['median_snr']:.2f}, "
              f"top-1% share of the squared gradient {summary[name]['median_top1_share']:.2f}")
    print(f"noise(stl) / noise(analytic), median over steps: {summary['median_noise_ratio_stl_over_analytic']:.2f}")
    return {"batch": args.batch, "run": str(args.run), "summary": summary, "per_step": per}


def warm(args) -> dict:
    if args.run is None:
        sys.exit("pathwise_diagnostics warm: --run DIR is required (the run whose guidance starts pathwise)")
    curves = {}
    for name, stl in ESTIMATORS.items():
        comp = components(args.run, [f"iterations={args.iterations}", f"method.stl={str(stl).lower()}",
                                     f"method.optimizer.lr={args.lr}", "method.lr_final_factor=1.0",
                                     f"method.batch_size={args.batch}", *args.overrides])
        torch.manual_seed(args.seed)
        curve = []
        for it in range(args.iterations + 1):
            if it:
                comp.method.fit_step(it)
            if it % args.every == 0 or it == args.iterations:
                m = comp.evaluator(comp.method, run_seed=0).metrics
                curve.append({"iteration": it, **{k: m[k] for k in ("mode_tv", "top_mode_frac", "sc_loss")}})
                print(f"{name:9s} it {it:3d}: mode_tv {m['mode_tv']:.4f}  sc_loss {m['sc_loss']:.4f}", flush=True)
        curves[name] = curve
    return {"run": str(args.run), "lr": args.lr, "batch": args.batch, "curves": curves}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    for name in ("grad", "warm"):
        p = sub.add_parser(name)
        p.add_argument("--run", type=Path, default=None, help="run directory whose guidance weights to load")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--threads", type=int, default=None)
        p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench" / f"pathwise_{name}.json")
        p.add_argument("overrides", nargs="*", default=["base_model=gmm_exact"],
                       help="config overrides (default: base_model=gmm_exact)")
    sub.choices["grad"].add_argument("--batch", type=int, default=2048)
    w = sub.choices["warm"]
    w.add_argument("--batch", type=int, default=256)
    w.add_argument("--lr", type=float, default=1e-3)
    w.add_argument("--iterations", type=int, default=15)
    w.add_argument("--every", type=int, default=3)
    args, extra = ap.parse_known_args()  # overrides may come before and after the options
    if any(e.startswith("-") for e in extra):
        ap.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = [*args.overrides, *extra]
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"command": args.command, **(grad_stats(args) if args.command == "grad" else warm(args))}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
