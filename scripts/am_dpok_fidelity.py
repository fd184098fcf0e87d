"""Adjoint matching's regression target (``method.target``: pre- or post-step adjoint) and DPOK's return
(``method.kl_in_return``: published or with the later steps' KL) on the toy, against the exact tilted target.

    python scripts/am_dpok_fidelity.py                     # -> outputs/bench/am_dpok_fidelity.json (and a table)
    python scripts/am_dpok_fidelity.py --dry-run           # print the runs it would make
    python scripts/am_dpok_fidelity.py --seeds 0 --only figure1/am_post figure1/am_pre

Every run is ``iif-train experiment=toy2d base_model=gmm_exact iterations=20`` (figure1's ``ci`` scale) with one
torch thread, one run at a time, in ``outputs/bench/am_dpok_fidelity/<case>/<variant>_seed<s>``; a run whose
``metrics.json`` exists is not run again (delete the folder to rerun it). Cases (a tilt, and the sampler):

* ``figure1``: the figure's reward (``conf/reward/gmm.yaml``), ``lambda = 1``, 100 steps;
* ``shifted_lam2``: the reward's four modes moved off the prior grid and rotated, ``lambda = 2`` (a flatter tilt);
* ``shifted_lam05``: other off-grid modes, ``lambda = 0.5`` (a sharper tilt);
* ``figure1_n10``: figure1's tilt on a 10-step sampler (``sampler.n_steps=10``), where the two AM targets differ
  most (the pre-step one is 0.39 of the post-step one at the noisiest step on Gaussian data);
* ``figure1_n10_it100``: the same, 100 iterations (closer to the fixed points).

Variants: ``base`` (no fine-tuning, for scale), ``am_pre``, ``am_post``, and on ``figure1`` and ``shifted_lam2``
``dpok_published`` and ``dpok_kl_in_return``. Also recorded per tilt: ``mode_tv`` of 10 000 exact target samples (the metric's noise floor).
Summary: mean and standard error over seeds of ``mode_tv``, ``energy_distance``, ``sc_loss``, ``wall_s`` (and
``reward_mean``, ``kl_path``), and ``mode_tv_chain``.

``mode_tv_chain``: ``mode_tv`` against the tilt of the *chain* instead of the continuous target. The N-step chain's
tilted path measure (the discrete problem's optimum, the minimiser of ``sc_loss``) has the end law
``p^0_chain(x_0) e^{r/lambda} / Z``, ``p^0_chain`` the base chain's end law, which is not the data law (the DDPM
chain with ``c_k^2 = beta_k`` is not exact in discrete time; at 10 steps the base's ``mode_tv`` differs markedly).
Its mode masses are estimated by self-normalised importance weights ``e^{r(x_0)/lambda}`` on ``chain_samples``
base-chain samples (``x_N ~ N(0, I)`` untilted, as the guided chains start). Each run's guidance is reloaded from its
checkpoint and sampled at the evaluator's seed (the same 10 000 samples as its ``mode_tv``: checked).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from iif.gmm import GMM  # noqa: E402
from iif.metrics.toy import mode_tv  # noqa: E402
from iif.rewards.gmm import GMMReward  # noqa: E402
from iif.targets import TiltedGMMTarget  # noqa: E402

OUT = ROOT / "outputs" / "bench"
RUNS = OUT / "am_dpok_fidelity"
COMMON = ["experiment=toy2d", "base_model=gmm_exact", "iterations=20", "logger=none", "torch_threads=1"]
FIGURE1_REWARD = dict(means=[[2.0, 2.0], [2.0, -2.0], [-2.0, 2.0], [-2.0, -2.0]], weights=[0.1, 0.2, 0.3, 0.4],
                      var=1.0)
TILTS = {
    "figure1": dict(FIGURE1_REWARD, temperature=1.0),
    "shifted_lam2": dict(FIGURE1_REWARD, means=[[3.0, 1.0], [1.0, -3.0], [-3.0, -1.0], [-1.0, 3.0]],
                         temperature=2.0),
    "shifted_lam05": dict(FIGURE1_REWARD, means=[[1.0, 1.0], [3.0, -3.0], [-3.0, 1.0], [-1.0, -3.0]],
                          temperature=0.5),
}
VARIANTS = {
    "base": ["method=base"],
    "am_pre": ["method=am", "method.target=pre"],
    "am_post": ["method=am", "method.target=post"],
    "dpok_published": ["method=dpok", "method.kl_in_return=false"],
    "dpok_kl_in_return": ["method=dpok", "method.kl_in_return=true"],
}
CASES = {  # name: (tilt, extra overrides, extra overrides of the AM variants)
    "figure1": ("figure1", [], []),
    "shifted_lam2": ("shifted_lam2", [], []),
    "shifted_lam05": ("shifted_lam05", [], []),
    "figure1_n10": ("figure1", ["sampler.n_steps=10"], ["method.loss_steps=10"]),  # every step in the loss
    "figure1_n10_it100": ("figure1", ["sampler.n_steps=10", "iterations=100"], ["method.loss_steps=10"]),
}
PLAN = {"figure1": list(VARIANTS), "shifted_lam2": list(VARIANTS),
        "shifted_lam05": ["base", "am_pre", "am_post"], "figure1_n10": ["base", "am_pre", "am_post"],
        "figure1_n10_it100": ["am_pre", "am_post"]}
METRICS = ("mode_tv", "energy_distance", "sc_loss", "wall_s", "reward_mean", "kl_path", "mode_tv_chain")
CHAIN_SAMPLES = {10: 1_000_000, 100: 200_000}  # base-chain samples for the chain tilt, by sampler steps


def reward_overrides(tilt: dict) -> list[str]:
    fmt = lambda v: json.dumps(v).replace(" ", "")  # noqa: E731
    return [f"reward.means={fmt(tilt['means'])}", f"reward.weights={fmt(tilt['weights'])}",
            f"reward.var={tilt['var']}", f"reward.temperature={tilt['temperature']}"]


def noise_floor(tilt: dict, n: int = 10_000, seed: int = 0) -> float:
    """``mode_tv`` of ``n`` exact target samples (the figure's prior: the 5 x 5 grid, variance 0.1)."""
    prior = GMM.grid([-4.0, -2.0, 0.0, 2.0, 4.0], var=0.1, dim=2)
    target = TiltedGMMTarget(prior, GMMReward(**tilt))
    return mode_tv(target.sample(n, generator=torch.Generator().manual_seed(seed)), target)


def problem(run_dir: Path):
    """The resolved config of a run and its prior, base, reward and sampler."""
    cfg = OmegaConf.load(run_dir / "config.yaml")
    prior = instantiate(cfg.prior)
    base, reward, sampler = instantiate(cfg.base_model, prior=prior), instantiate(cfg.reward), instantiate(cfg.sampler)
    return cfg, prior, base, reward, sampler


def chain_tilt(run_dir: Path, n: int, chunk: int = 50_000, seed: int = 777) -> tuple[torch.Tensor, float]:
    """Mode masses ``[K]`` of the chain's tilted end law of ``run_dir``'s problem (module docstring), and the
    ``mode_tv`` of 10 000 draws from them by importance resampling (its noise floor)."""
    cfg, prior, base, reward, sampler = problem(run_dir)
    mass, total, keep = torch.zeros(prior.n_components, dtype=torch.float64), 0.0, []
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for _ in range(n // chunk):
            x = sampler.sample(base, None, chunk).x0
            w = torch.exp(reward.log_tilt(x).double())
            mass += torch.bincount(prior.nearest_mode(x), weights=w, minlength=prior.n_components)
            total += w.sum().item()
            keep.append((x, w))
        x = torch.cat([a for a, _ in keep])
        w = torch.cat([b for _, b in keep])
        draws = x[torch.multinomial(w / w.sum(), 10_000, replacement=True)]
    weights = mass / total
    floor = 0.5 * (torch.bincount(prior.nearest_mode(draws), minlength=prior.n_components).double() / 10_000
                   - weights).abs().sum().item()
    return weights, floor


def resampled_mode_tv(run_dir: Path, chain_weights: torch.Tensor) -> tuple[float, float]:
    """(``mode_tv`` against the continuous target, ``mode_tv_chain``) of the evaluator's samples of the run's model,
    rebuilt from ``config.yaml`` and the guidance in ``checkpoint.pt``."""
    cfg, prior, base, reward, sampler = problem(run_dir)
    guidance = None
    if cfg.method._target_ != "iif.methods.base_only.BaseOnly":
        guidance = instantiate(cfg.guidance, base=base, reward=reward)
        trainer = torch.load(run_dir / "checkpoint.pt", weights_only=False, map_location="cpu")["state"]["trainer"]
        loaded = guidance.load_state_dict(trainer["ema"] or trainer["module"], strict=False)
        trainable = {name for name, p in guidance.named_parameters() if p.requires_grad}
        if trainable & set(loaded.missing_keys) or loaded.unexpected_keys:
            sys.exit(f"am_dpok_fidelity: the guidance in {run_dir} does not fit its config")
    target = TiltedGMMTarget(prior, reward)
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(cfg.evaluation.seed + 1000 * cfg.seed)
        x = sampler.sample(base, guidance, cfg.evaluation.n_samples).x0
    hist = torch.bincount(prior.nearest_mode(x), minlength=prior.n_components).double() / len(x)
    return mode_tv(x, target), 0.5 * (hist - chain_weights).abs().sum().item()


def run(case: str, variant: str, seed: int, dry_run: bool, chain: torch.Tensor | None = None) -> dict | None:
    tilt, extra, am_extra = CASES[case]
    run_dir = RUNS / case / f"{variant}_seed{seed}"
    extra = [*extra, *(am_extra if variant.startswith("am_") else [])]
    common = [o for o in COMMON if o.split("=")[0] not in {e.split("=")[0] for e in extra}]
    overrides = [*common, *extra, *VARIANTS[variant], *reward_overrides(TILTS[tilt]), f"seed={seed}",
                 f"hydra.run.dir={run_dir.relative_to(ROOT)}"]
    cmd = [sys.executable, "-m", "iif.train", *overrides]
    metrics = run_dir / "metrics.json"
    if dry_run:
        print(("[done] " if metrics.is_file() else "") + " ".join(cmd[1:]))
        return None
    if not metrics.is_file():
        env = dict(os.environ, WANDB_MODE="offline", OMP_NUM_THREADS="1")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"am_dpok_fidelity: run failed ({' '.join(cmd[1:])}):\n{proc.stderr[-3000:]}")
        print(f"  {case}/{variant} seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
    final = json.loads(metrics.read_text())
    if chain is not None:
        again, final["mode_tv_chain"] = resampled_mode_tv(run_dir, chain)
        if abs(again - final["mode_tv"]) > 1e-9:
            sys.exit(f"am_dpok_fidelity: {run_dir}: the reloaded model's mode_tv {again} is not the run's "
                     f"{final['mode_tv']}")
    return {"case": case, "variant": variant, "seed": seed, "overrides": overrides,
            **{k: final.get(k) for k in METRICS}}


def summarise(rows: list[dict]) -> dict:
    out: dict = {}
    for row in rows:
        out.setdefault(row["case"], {}).setdefault(row["variant"], []).append(row)
    summary = {}
    for case, variants in out.items():
        summary[case] = {}
        for variant, runs in variants.items():
            stats = {"seeds": [r["seed"] for r in runs]}
            for k in METRICS:
                vals = [r[k] for r in runs if r[k] is not None]
                if not vals:
                    continue
                mean = sum(vals) / len(vals)
                se = (math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1) / len(vals))
                      if len(vals) > 1 else float("nan"))
                stats[k] = {"mean": mean, "se": se}
            summary[case][variant] = stats
    return summary


def table(summary: dict, floors: dict, chain_floors: dict) -> str:
    lines = []
    for case, variants in summary.items():
        tilt, extra, _ = CASES[case]
        lam = TILTS[tilt]["temperature"]
        lines += [f"\n{case} (lambda = {lam} {' '.join(extra)}; exact samples: mode_tv {floors[tilt]:.4f}, "
                  f"chain-tilt samples: mode_tv_chain {chain_floors[case]:.4f})",
                  "| variant | mode_tv | mode_tv_chain | energy_distance | sc_loss | wall_s |",
                  "|---|---|---|---|---|---|"]
        for variant, s in variants.items():
            cell = lambda k, f: (f"{s[k]['mean']:{f}} ± {s[k]['se']:{f}}" if k in s else "—")  # noqa: E731
            lines.append(f"| {variant} | {cell('mode_tv', '.4f')} | {cell('mode_tv_chain', '.4f')} | "
                         f"{cell('energy_distance', '.4f')} | "
                         f"{cell('sc_loss', '.3f')} | {cell('wall_s', '.1f')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", nargs="+", default=None, help="case/variant pairs, e.g. figure1/am_post")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the machine is shared; the runs use one thread too
    jobs = [(c, v) for c, vs in PLAN.items() for v in vs if args.only is None or f"{c}/{v}" in args.only]
    rows = [r for t, v in jobs for s in args.seeds if (r := run(t, v, s, args.dry_run)) is not None]
    if args.dry_run:
        return
    chains, chain_floors = {}, {}
    for case in dict.fromkeys(c for c, _ in jobs):  # the chain's tilt from the first run of each case
        first = RUNS / case / f"{PLAN[case][0]}_seed{args.seeds[0]}"
        n_steps = int(OmegaConf.load(first / "config.yaml").sampler.n_steps)
        chains[case], chain_floors[case] = chain_tilt(first, CHAIN_SAMPLES.get(n_steps, 200_000))
        print(f"  {case}: chain tilt from {CHAIN_SAMPLES.get(n_steps, 200_000)} base-chain samples", flush=True)
    rows = [run(r["case"], r["variant"], r["seed"], False, chains[r["case"]]) for r in rows]
    floors = {t: noise_floor(TILTS[t]) for t in dict.fromkeys(CASES[c][0] for c, _ in jobs)}
    summary = summarise(rows)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    OUT.mkdir(parents=True, exist_ok=True)
    result = {"commit": commit, "common_overrides": COMMON, "tilts": TILTS, "cases": CASES,
              "exact_sample_mode_tv": floors, "chain_tilt_sample_mode_tv": chain_floors,
              "chain_tilt_mode_weights": {c: w.tolist() for c, w in chains.items()},
              "summary": summary, "runs": rows}
    path = OUT / "am_dpok_fidelity.json"
    path.write_text(json.dumps(result, indent=1))
    print(table(summary, floors, chain_floors))
    print(f"\nwrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
