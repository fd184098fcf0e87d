"""``iif-reproduce ARTIFACT``: run the sweep of ``experiments/ARTIFACT/spec.yaml`` through Hydra, aggregate the run
directories (mean ± standard error over seeds) into ``outputs/ARTIFACT/table.md|csv`` and ``figure.png``, and
check the paper's qualitative claims.

    iif-reproduce figure1                  # the 2D toy, CPU scale
    iif-reproduce figure1 --seeds 0        # quicker
    iif-reproduce figure1 -- iterations=20 # extra Hydra overrides for every run
    iif-reproduce table1 figure2 --jobs 2  # several artifacts, their runs in one pool
    iif-reproduce table1 --scale paper --dry-run -- launcher=slurm   # every run checked, the plan printed, no run
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import os
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import torch
from omegaconf import OmegaConf

from iif.table import aggregate, load_runs, write_tables
from iif.utils import ConfigError, RunError

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = ROOT / "experiments"


def load_spec(name: str):
    path = EXPERIMENTS / name / "spec.yaml"
    if not path.exists():
        known = sorted(p.parent.name for p in EXPERIMENTS.glob("*/spec.yaml"))
        raise SystemExit(f"iif-reproduce: error: unknown artifact '{name}'; known: {', '.join(known)}")
    spec = OmegaConf.load(path)
    for method, where in (spec.get("only_on") or {}).items():
        if method not in spec.methods:
            raise SystemExit(f"iif-reproduce: error: {path}: only_on names '{method}', not one of the spec's methods")
        unknown = [s for s in where if s not in settings_of(spec)]
        if unknown:
            raise SystemExit(f"iif-reproduce: error: {path}: only_on.{method} names setting '{unknown[0]}'; the spec "
                             f"has {list(settings_of(spec))}")
    return spec


def methods_of(spec, setting: str) -> list[str]:
    """The spec's methods that run on ``setting``: all but those whose ``only_on`` list leaves it out (e.g. adjoint
    sampling, which needs a Gaussian base, only on the sampling problems)."""
    only = spec.get("only_on") or {}
    return [m for m in spec.methods if m not in only or setting in only[m]]


def experiment_of(spec, scale: str) -> str:
    """The spec's experiment preset: one name, or one per scale (``{ci: mnist_superres, paper: flowers_superres}``)."""
    return spec.experiment if isinstance(spec.experiment, str) else spec.experiment[scale]


def settings_of(spec) -> dict[str, list[str]]:
    """The spec's column groups ``{name: extra overrides}`` (e.g. table1's single class and even digits); a spec
    without ``settings`` has one unnamed group."""
    return {str(k): list(v) for k, v in (spec.get("settings") or {"": []}).items()}


def with_experiment(spec, scale: str, overrides: list[str]) -> list[str]:
    """``experiment=<the spec's>`` and then ``overrides``, unless they choose the experiment themselves (the settings
    of an artifact over several problems, e.g. logz's energies): then their choice, first (Hydra takes one value
    per key)."""
    own = [o for o in overrides if o.startswith("experiment=")]
    rest = [o for o in overrides if not o.startswith("experiment=")]
    return [own[-1] if own else f"experiment={experiment_of(spec, scale)}", *rest]


def run_overrides(spec, scale: str, extra: list[str] = (), method_overrides: list[str] = ()) -> list[str]:
    """The overrides of a run of the artifact at ``scale`` (besides ``method`` and ``seed``), in the order they
    apply: the experiment (the spec's, or a setting's), the spec's, the scale's, the method's (its sizes, a tuned
    value), then ``extra`` (a setting's and the user's: they win)."""
    return with_experiment(spec, scale, [*spec.overrides, *spec.scales[scale], *method_overrides, *extra])


def run_sweep(spec, scale: str, seeds: list[int], runs_dir: Path, extra: list[str],
              methods: list[str] | None = None, method_overrides: list[str] = (), subdir: str | None = None,
              threads: int | None = None) -> None:
    """One Hydra multirun over methods x seeds, its runs in turn in one process (``run_settings`` runs several at
    once); ``threads``: torch threads of each run (default: all cores)."""
    cmd = sweep_command(spec, scale, seeds, runs_dir, extra, methods, method_overrides, subdir, threads)
    print("+", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={"WANDB_SILENT": "true", **os.environ})


def sweep_command(spec, scale: str, seeds: list[int], runs_dir: Path, extra: list[str],
                  methods: list[str] | None = None, method_overrides: list[str] = (), subdir: str | None = None,
                  threads: int | None = None) -> list[str]:
    """The command line of :func:`run_sweep`'s multirun (``--dry-run`` prints it)."""
    return [sys.executable, "-m", "iif.train", "-m", *([f"torch_threads={threads}"] if threads else []),
            f"method={','.join(methods or spec.methods)}",
            f"seed={','.join(map(str, seeds))}", *run_overrides(spec, scale, extra, method_overrides),
            f"hydra.sweep.dir={runs_dir}",
            f"hydra.sweep.subdir={subdir or '${hydra:runtime.choices.method}_seed${seed}'}"]


def tune(spec, scale: str, runs_dir: Path, extra: list[str], threads: int | None = None) -> dict[str, str]:
    """Choose the parameter of each method of ``spec.tune`` by its criterion: one run per grid value of the tuning
    method (``tune.<m>.method``, default ``m``) with the tuning seed (not one of the reported seeds), then the value
    whose ``metric`` is best. Runs sharing a grid are made once. Returns ``{method: "key=value"}``, also written to
    ``runs_dir/tuned.json``."""
    chosen, done = {}, set()
    for method, t in (spec.get("tune") or {}).items():
        if method not in spec.methods:  # not run (--methods)
            continue
        grid = tuning_grid(spec, scale, runs_dir, method)
        folder, values = grid["runs_dir"], [str(v) for v in t["values"]]
        if (grid["methods"][0], t.key) not in done and not all((folder / f"v{v}" / "metrics.json").exists()
                                                               for v in values):
            run_sweep(spec, scale, extra=extra, threads=threads, **grid)
        done.add((grid["methods"][0], t.key))
        scores = {v: json.loads((folder / f"v{v}" / "metrics.json").read_text())[t.metric] for v in values}
        pick = (min if t.get("goal", "min") == "min" else max)(scores, key=scores.get)
        chosen[method] = f"{t.key}={pick}"
        print(f"tuned {method}: {t.key}={pick} ({t.metric}: " + ", ".join(f"{v}: {x:.4g}" for v, x in scores.items())
              + ")", flush=True)
    if chosen:
        (runs_dir / "tuned.json").write_text(json.dumps(chosen, indent=1))
    return chosen


def tuning_grid(spec, scale: str, runs_dir: Path, method: str) -> dict:
    """The multirun of ``method``'s tuning grid (``spec.tune``): :func:`run_sweep`'s arguments but ``extra`` and
    ``threads``: the grid method (``tune.<m>.method``, default ``m``) with its own sizes and every grid value, the
    tuning seed, run directories ``<runs_dir>/tune_<grid method>/v<value>``."""
    t = spec.tune[method]
    grid_method = t.get("method", method)
    values = ",".join(str(v) for v in t["values"])
    return {"seeds": [int(t.get("seed", 100))], "runs_dir": (runs_dir / f"tune_{grid_method}").resolve(),
            "methods": [grid_method], "subdir": f"v${{{t.key}}}",
            "method_overrides": [*method_overrides(spec, scale, grid_method), f"{t.key}={values}"]}


def prepare_base(spec, scale: str, extra: list[str], job_dir: Path) -> None:
    """Pretrain (or load) the shared base model, classifier and reference once, before parallel runs would each
    try to; on the runs' device (``-- device=cuda``). With a cluster launcher (``-- launcher=slurm``: a submitit
    one) as one job of it (``iif-prepare``; its files in ``job_dir``), not on this node: a login node may have no
    GPU, and paper-scale pretraining is a GPU's work."""
    from iif.config import compose
    from iif.hub import with_prefetch_command
    from iif.prepare import prepare

    cfg, choices = compose([*run_overrides(spec, scale, extra), "logger=none"])
    cmd = prepare_command(spec, scale, extra, job_dir, choices)
    if cmd is None:
        try:
            prepare(cfg, job_dir)
        except ConfigError as e:  # a missing hub weight: the fetch command for these runs' overrides
            filled = with_prefetch_command(e, run_overrides(spec, scale, extra))
            if filled is e:
                raise
            raise filled from e
        return
    print("+", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={"WANDB_SILENT": "true", **os.environ})


def prepare_command(spec, scale: str, extra: list[str], job_dir: Path, choices: dict[str, str]) -> list[str] | None:
    """The ``iif-prepare`` job's command line under a cluster launcher (a submitit one, in ``choices``); ``None``:
    the preparation runs in this process."""
    if not str(choices.get("hydra/launcher", "")).startswith("submitit"):
        return None
    return [sys.executable, "-m", "iif.prepare", "-m", *run_overrides(spec, scale, extra), "logger=none",
            f"hydra.sweep.dir={Path(job_dir).resolve()}", "hydra.sweep.subdir=."]


def run_settings(spec, scale: str, seeds: list[int], settings: dict[str, tuple[Path, list[str]]],
                 jobs: int) -> None:
    """One artifact's runs: :func:`run_plans` with one plan."""
    run_plans([(spec, seeds, settings)], scale, jobs)


def run_plans(plans: list[tuple], scale: str, jobs: int) -> None:
    """The runs of one or more artifacts, ``plans``: ``(spec, seeds, settings)`` each, ``settings``
    ``{name: (runs_dir, extra overrides)}``. Pretraining and references first, setting after setting (what they
    share is made once); then the settings' tuning grids and method multiruns (each method with its own sizes,
    ``spec.method_overrides[scale]``, and its tuned value, after its setting's tuning) in one pool, setting after
    setting and artifact after artifact, so that one setting's last runs overlap the next one's first (a pool per
    setting left a core idle at each setting's end).

    With ``jobs > 1``, ``jobs`` multiruns at a time, each one process with one torch thread running its seeds in
    turn, so that one multirun's start-up overlaps another's compute (a joblib pool per multirun left the cores idle
    between multiruns). A multirun is a method (one start-up for its seeds) when there are at least two methods per
    job, else a single run (figure2's two methods: no core idles while one method's seeds run in turn)."""
    for spec, _, settings in plans:
        for runs_dir, extra in settings.values():
            prepare_base(spec, scale, extra, runs_dir / "prepare")
    threads = 1 if jobs > 1 else None
    failures: dict[Path, list[str]] = {}
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        labels = {}  # future -> what it runs, for the progress lines
        for spec, seeds, settings in plans:
            for name, (runs_dir, extra) in settings.items():
                own = OmegaConf.merge(spec, {"methods": methods_of(spec, name)})
                failures[runs_dir.resolve()] = []
                for label, future in _submit_setting(pool, own, scale, seeds, runs_dir.resolve(), extra, jobs,
                                                     threads, failures[runs_dir.resolve()]):
                    prefix = "/".join(part for part in (spec.name if len(plans) > 1 else "", name) if part)
                    labels[future] = f"{prefix}: {label}" if prefix else label
        futures = list(labels)
        try:
            for done, f in enumerate(as_completed(futures), 1):
                f.result()  # the first failure stops what has not started, and is raised
                print(f"iif-reproduce: {done}/{len(futures)} done ({labels[f]}) after "
                      f"{(time.perf_counter() - t0) / 60:.1f} min", flush=True)
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    for runs_dir, failed in failures.items():  # the report lists them (a diverged run has no metrics.json)
        if failed:
            (runs_dir / "failed.json").write_text(json.dumps(sorted(failed)))


def _submit_setting(pool, spec, scale: str, seeds: list[int], runs_dir: Path, extra: list[str], jobs: int,
                    threads: int | None, failures: list[str]) -> list[tuple[str, object]]:
    """Submit one setting's tuning grid, then its untuned methods' multiruns, then its tuned ones (whose worker
    waits for the tuning, which was submitted before them: it has started or finished by then). Returns
    ``(label, future)`` pairs (the tuning's only when the spec tunes something); a run of a ``may_fail`` method that
    fails is appended to ``failures`` instead of raising."""
    tuned = set(spec.get("tune") or {})
    may_fail = set(spec.get("may_fail") or [])
    tasks = multiruns(spec, seeds, jobs)
    (runs_dir / "failed.json").unlink(missing_ok=True)
    tuning = pool.submit(tune, spec, scale, runs_dir, extra, threads)

    def run_task(method: str, task_seeds: list[int]) -> None:
        own = [*method_overrides(spec, scale, method), *([tuning.result()[method]] if method in tuned else [])]
        try:
            run_sweep(spec, scale, task_seeds, runs_dir, extra, methods=[method], method_overrides=own,
                      threads=threads)
        except subprocess.CalledProcessError:
            if method not in may_fail:
                raise
            failures.append(f"{method} seed {','.join(map(str, task_seeds))}")

    runs = [(f"{m} seed {','.join(map(str, s))}", pool.submit(run_task, m, s)) for m, s in tasks]
    return [*([("tuning grid", tuning)] if tuned else []), *runs]


def multiruns(spec, seeds: list[int], jobs: int) -> list[tuple[str, list[int]]]:
    """How a setting's runs are split into multiruns ``(method, seeds)``, in the order they are submitted (the
    tuned methods last): a method's seeds in one multirun (one start-up), unless there are fewer than two methods
    per job (then a run each, so that no core idles while one method's seeds run in turn); a ``may_fail`` method
    (expected to diverge on some problems) a run per seed, so that a failure loses one run."""
    tuned = set(spec.get("tune") or {})
    per_method = jobs <= 1 or len(spec.methods) >= 2 * jobs
    may_fail = set(spec.get("may_fail") or [])
    tasks = ([(m, list(seeds)) for m in spec.methods if m not in may_fail] if per_method
             else [(m, [seed]) for m in spec.methods if m not in may_fail for seed in seeds])
    tasks += [(m, [seed]) for m in spec.methods if m in may_fail for seed in seeds]
    return sorted(tasks, key=lambda task: task[0] in tuned)


def check_runs(spec, scale: str, where: dict[str, tuple[Path, list[str]]]) -> dict[tuple[str, str], tuple]:
    """Every run of one artifact composed by Hydra and checked (``iif.checks``: the loop's sizes, the components'
    pairing, the processes per run under a cluster launcher) before anything is written or started, so that a
    misspelt override or an impossible pairing is one error line, not a traceback after pretraining or a failed job
    of an array. One config per setting and method (seeds do not change it; a tuned method with its grid's first
    value). Returns ``{(setting, method): (cfg, choices)}``. What only a constructor or the data can refuse is found
    when a run builds its components."""
    from hydra.errors import HydraException

    from iif import device as devices
    from iif.checks import check_pairing, check_sizes, check_world
    from iif.config import compose
    from iif.distributed import World

    tune = spec.get("tune") or {}
    configs = {}
    for setting, (_, extra) in where.items():
        for method in methods_of(spec, setting):
            own = [*method_overrides(spec, scale, method),
                   *([f"{tune[method].key}={tune[method]['values'][0]}"] if method in tune else [])]
            try:
                cfg, choices = compose([f"method={method}", *run_overrides(spec, scale, extra, own), "logger=none"])
                check_sizes(cfg)
                check_pairing(cfg, choices)
                if str(choices.get("hydra/launcher", "")).startswith("submitit"):
                    check_world(cfg, choices, World(size=int(cfg.resources.tasks_per_node)))
                else:  # the runs' device is this machine's (a cluster job's is the node's)
                    devices.resolve(cfg.get("device", "cpu"))
            except (HydraException, ConfigError) as e:
                run = "/".join(part for part in (spec.name, setting, method) if part)
                text = str(e).split("Config search path:")[0]  # Hydra's message, on one line
                raise ConfigError(f"{run}: " + " ".join(line.strip() for line in text.splitlines()
                                                        if line.strip(" ^"))) from e
            configs[setting, method] = cfg, choices
    return configs


def dry_run(plans: list[tuple], scale: str, jobs: int, checked: list[dict]) -> int:
    """``--dry-run``: what :func:`run_plans` would do, from the configs :func:`check_runs` composed: per setting the
    preparation, the tuning grids, each method's sizes, then every multirun's command line (a tuned value as
    ``<tuned>``). Returns the number of runs."""
    from iif.config import derived_sizes

    n_runs = n_multiruns = 0
    threads = 1 if jobs > 1 else None
    for (spec, seeds, where, _), configs in zip(plans, checked):
        tune = spec.get("tune") or {}
        for setting, (runs_dir, extra) in where.items():
            methods = methods_of(spec, setting)
            cfg, choices = configs[setting, methods[0]]
            label = "/".join(part for part in (spec.name, setting) if part)
            print(f"\n{label}: experiment {choices.get('experiment')}, {cfg.iterations} iterations, device "
                  f"{cfg.get('device', 'cpu')}, launcher {choices.get('hydra/launcher')}; runs in {runs_dir}")
            job = prepare_command(spec, scale, extra, runs_dir / "prepare", choices)
            print("  prepare (pretraining and references, cached): "
                  + ("in this process" if job is None else "one job of the launcher: " + " ".join(job)))
            grids = {}  # tuned methods sharing a grid share its runs
            for method, t in tune.items():
                if method in methods:
                    grid = tuning_grid(spec, scale, runs_dir, method)
                    grids.setdefault((grid["methods"][0], t.key), (grid, []))[1].append(
                        f"{method} by {t.metric} ({t.get('goal', 'min')})")
            commands = []
            for (grid_method, key), (grid, chooses) in grids.items():
                values = grid["method_overrides"][-1].split("=", 1)[1]
                print(f"  tuning grid: {grid_method} {key} = {values} (seed {grid['seeds'][0]}): "
                      f"{len(values.split(','))} runs; chooses {'; '.join(chooses)}")
                commands.append(sweep_command(spec, scale, extra=extra, threads=threads, **grid))
                n_runs += len(values.split(","))
            width = max(map(len, methods))
            for method in methods:
                tuned = f"; {tune[method].key} tuned" if method in tune else ""
                print(f"  {method:<{width}}  seeds {','.join(map(str, seeds))}: "
                      f"{derived_sizes(configs[setting, method][0])}{tuned}")
            n_runs += len(methods) * len(seeds)
            own = OmegaConf.merge(spec, {"methods": methods})
            for method, task_seeds in multiruns(own, seeds, jobs):
                tuned = [f"{tune[method].key}=<tuned>"] if method in tune else []
                commands.append(sweep_command(spec, scale, task_seeds, runs_dir.resolve(), extra, [method],
                                              [*method_overrides(spec, scale, method), *tuned], threads=threads))
            print("".join(f"  + {shlex.join(cmd)}\n" for cmd in commands), end="")
            n_multiruns += len(commands)
    print(f"\niif-reproduce: dry run: {n_runs} runs in {n_multiruns} multiruns, {max(1, jobs)} at a time; every "
          "run's config composed and checked (sizes, pairing); nothing was run or written")
    return n_runs


def method_overrides(spec, scale: str, method: str) -> list[str]:
    """The spec's overrides of one method at one scale (its sizes: keys that other methods do not have)."""
    return list(((spec.get("method_overrides") or {}).get(scale) or {}).get(method) or [])


def finite(table) -> bool:
    """Whether every number in a (nested) table is finite (``finite(single)`` in a claim)."""
    if isinstance(table, dict):
        return all(finite(v) for v in table.values())
    return not isinstance(table, (int, float)) or math.isfinite(table)


# what a claim's expression may call besides the tables
CLAIM_FUNCTIONS = {"finite": finite, "all_of": all, "any_of": any, "mean_of": lambda xs: sum(xs) / len(xs),
                   "abs": abs, "min": min, "max": max}


def check_claims(spec, tables: dict[str, dict], scale: str | None = None) -> list[str]:
    """Evaluate each claim's expression; lines ``PASS/FAIL claim (numbers)``. ``tables``: per setting
    ``{metric: {method: mean}}`` (and ``curve``: the curve's summary); without settings the metrics are names of
    the expression, else the settings are (``single['fid']['iif']``), and ``settings`` holds those that were run. A
    claim with ``scales`` is checked at those
    scales only (a claim about the science means nothing on a smoke scale)."""
    names = tables.get("", {}) | {k: v for k, v in tables.items() if k}
    names["settings"] = {k: v for k, v in tables.items() if k}  # every setting that was run (finite(settings))
    out = []
    for check in spec.checks:
        if check.get("scales") and scale is not None and scale not in check.scales:
            out.append(f"SKIP (checked at scale {', '.join(check.scales)}): {check.claim}")
            continue
        try:
            # expressions come from the repo's spec; names as globals, so that comprehensions see them
            ok = bool(eval(check.expr, {"__builtins__": {}, **CLAIM_FUNCTIONS, **names}))
            verdict = "PASS" if ok else "FAIL"
        except KeyError as e:
            verdict = f"SKIP (no {e} row)"
        except NameError as e:  # a setting that was not run (--settings)
            verdict = f"SKIP ({e.name} not run)"
        out.append(f"{verdict}: {check.claim} — {check.expr} ({_numbers(check.expr, names)})")
    return out


def _numbers(expr: str, names: dict) -> str:
    """The values an expression reads, ``name['key']`` or ``name['key']['method']``, as ``name[key][method]=v``."""
    nums = []
    for name, key, sub in re.findall(r"(\w+)\['([^']+)'\](?:\['([^']+)'\])?", expr):
        value = names.get(name, {}).get(key)
        value = value.get(sub) if sub and isinstance(value, dict) else value
        if isinstance(value, (int, float)):
            nums.append(f"{name}[{key}]" + (f"[{sub}]" if sub else "") + f"={value:.4g}")
    return ", ".join(dict.fromkeys(nums))


def make_figure(spec, scale: str, rows: list[dict], out_path: Path, overrides: list[str]) -> None:
    """The experiment's evaluator draws the figure: one panel per method, the samples of its first seed's run."""
    from iif.build import build
    from iif.config import compose

    cfg, _ = compose([*with_experiment(spec, scale, [*spec.overrides, *overrides]), "logger=none"])
    evaluator = build(cfg).evaluator
    panels = {}
    for r in rows:
        runs = sorted(Path(d) for d in r["run_dirs"])
        panels[r["method"]] = torch.load(runs[0] / "samples.pt", weights_only=True)
    fig = evaluator.figure(panels)
    fig.savefig(out_path, dpi=130)
    fig.clf()


def curve(spec, runs: list[dict], out_dir: Path) -> dict:
    """The per-iteration curve of ``spec.curve.metric`` (logged by evaluations during training, ``eval_every``) of
    ``spec.curve.method``: mean over seeds with its standard error (from the within-run ``se`` of each evaluation,
    combined over seeds) written to ``curve.csv`` and ``curve.png``; a rise between consecutive evaluations counts
    as beyond noise when it exceeds ``z`` standard errors of the difference. Returns the summary for the claims."""
    c = spec.curve
    series = []
    for r in runs:
        if r["method"] != c.method:
            continue
        rows = [json.loads(line) for line in (Path(r["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        series.append({row["iteration"]: (row[c.metric], row.get(c.se, 0.0)) for row in rows if c.metric in row})
    if not series:
        raise SystemExit(f"iif-reproduce: error: no run of {c.method} logged {c.metric} (eval_every)")
    iters = sorted(set.intersection(*(set(s) for s in series)))
    if not iters:
        raise SystemExit(f"iif-reproduce: error: the runs of {c.method} share no evaluated iteration of {c.metric} "
                         "(set eval_every in the spec's scale)")
    mean = [sum(s[i][0] for s in series) / len(series) for i in iters]
    se = [math.sqrt(sum(s[i][1] ** 2 for s in series)) / len(series) for i in iters]
    z = float(c.get("z", 2.0))
    rises = [mean[k + 1] - mean[k] > z * math.sqrt(se[k] ** 2 + se[k + 1] ** 2) for k in range(len(iters) - 1)]
    summary = {"rise_frac": sum(rises) / max(1, len(rises)), "first": mean[0], "last": mean[-1],
               "n_seeds": len(series)}
    with (out_dir / "curve.csv").open("w") as f:
        f.write(f"iteration,{c.metric},{c.metric}_se\n")
        f.writelines(f"{i},{m!r},{e!r}\n" for i, m, e in zip(iters, mean, se))
    from iif.plotting import plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.errorbar(iters, mean, yerr=[2 * e for e in se], marker="o", ms=3, capsize=2)
    ax.set_xlabel("IIF iteration")
    ax.set_ylabel(f"{c.metric} (± 2 s.e.)")
    ax.set_title(c.get("title", c.metric))
    fig.tight_layout()
    fig.savefig(out_dir / "curve.png", dpi=130)
    plt.close(fig)
    return summary


def main(argv: list[str] | None = None) -> int:
    """``iif-reproduce``: a bad config or a failed step ends with one ``iif-reproduce: error:`` line (exit status 2:
    nothing was run; 1: a step failed), a failed run with a pointer to its own error above (the run printed it)."""
    try:
        return _main(argv)
    except (ConfigError, RunError) as e:
        print(f"iif-reproduce: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    except subprocess.CalledProcessError as e:
        step = e.cmd[2] if len(e.cmd) > 2 and e.cmd[1] == "-m" else e.cmd[0]  # iif.train, iif.prepare
        print(f"iif-reproduce: error: {step} exited with status {e.returncode}; its error is above", file=sys.stderr)
        return 1


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="iif-reproduce", description=__doc__.split("\n\n")[0])
    p.add_argument("artifacts", nargs="+", metavar="artifact",
                   help="folder name under experiments/, e.g. figure1; several (table1 figure2) share one pool of "
                        "--jobs and write their own outputs/ARTIFACT")
    p.add_argument("--scale", default="ci", help="ci (CPU minutes) or paper (published sizes)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: the spec's)")
    p.add_argument("--out", default=None, help="output folder (default outputs/ARTIFACT)")
    p.add_argument("--skip-runs", action="store_true", help="only aggregate existing run directories")
    p.add_argument("--prepare-only", action="store_true",
                   help="pretrain (or load) what every run shares (the base model, a classifier, each setting's "
                        "reference), then stop")
    p.add_argument("--methods", default=None,
                   help="comma-separated methods to run and tabulate, e.g. iif (default: the spec's)")
    p.add_argument("--settings", default=None,
                   help="comma-separated settings (column groups) to run, e.g. table2's rabbit (default: all)")
    p.add_argument("--dry-run", action="store_true",
                   help="compose and check every run's config, print the plan (the preparation, tuning grids, each "
                        "method's sizes, every command line) and stop: nothing runs, nothing is written")
    p.epilog = "Hydra overrides for every run go after --, e.g. iif-reproduce figure1 --seeds 0 -- iterations=20"
    p.add_argument("--jobs", type=int, default=1,
                   help="runs in parallel on this machine, one torch thread each; default 1: one after another "
                        "with all cores. On 2 cores, 2 jobs give 1.5x the throughput (make run uses JOBS=2)")
    argv = list(sys.argv[1:] if argv is None else argv)
    # Hydra overrides follow `--`; split them off first (argparse cannot take options between a positional and a
    # trailing `nargs="*"` positional: `figure1 --seeds 0 -- x=1` would be refused)
    cut = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:cut])
    args.overrides = argv[cut + 1:]
    for override in args.overrides:
        if override.startswith("-"):
            p.error(f"'{override}' follows --: options of iif-reproduce go before --, Hydra overrides after it")
        for key, flag in (("method", "--methods"), ("seed", "--seeds")):
            if override.split("=", 1)[0] == key:
                p.error(f"'{override}' after --: the spec sets each run's {key}; choose them with {flag}")
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")  # pretraining, references

    if args.out and len(args.artifacts) > 1:
        p.error("--out names one artifact's folder; with several, each writes to outputs/ARTIFACT")
    specs = [load_spec(name) for name in dict.fromkeys(args.artifacts)]
    for spec in specs:
        if args.scale not in spec.scales:
            p.error(f"unknown scale '{args.scale}'; {spec.name} has {list(spec.scales)}")
    studies = [spec.name for spec in specs if spec.get("study")]
    if studies and len(specs) > 1:
        p.error(f"{studies[0]} is a study (a computation, not a sweep of runs): reproduce it on its own")
    if studies and args.dry_run:
        p.error(f"{studies[0]} is a study (a computation, not a sweep of runs): --dry-run has no runs to plan")
    if args.dry_run and (args.skip_runs or args.prepare_only):
        p.error("--dry-run plans the runs; it goes with neither --skip-runs nor --prepare-only")
    if studies:
        return _study(specs[0], args)
    for flag, names, have in (("method", args.methods, lambda spec: spec.methods),
                              ("setting", args.settings, lambda spec: settings_of(spec))):
        unknown = [n for n in (names.split(",") if names and len(specs) > 1 else []) if
                   not any(n in have(spec) for spec in specs)]
        if unknown:
            p.error(f"unknown {flag} '{unknown[0]}': none of {', '.join(spec.name for spec in specs)} has it")
    plans = [_plan(p, spec, args, several=len(specs) > 1) for spec in specs]
    t0 = time.perf_counter()
    if not args.skip_runs:  # every run's config, before anything is written or started
        checked = [check_runs(spec, args.scale, where) for spec, _, where, _ in plans]
    if args.dry_run:
        dry_run(plans, args.scale, args.jobs, checked)
        return 0
    if args.prepare_only:
        for spec, _, where, _ in plans:
            for runs_dir, extra in where.values():
                prepare_base(spec, args.scale, extra, runs_dir / "prepare")
        names = " ".join(spec.name for spec, *_ in plans)
        print(f"iif-reproduce: {names} --scale {args.scale} prepared in {time.perf_counter() - t0:.0f} s", flush=True)
        return 0
    if not args.skip_runs:
        for _, _, where, _ in plans:
            for runs_dir, _ in where.values():
                runs_dir.mkdir(parents=True, exist_ok=True)
        run_plans([(spec, seeds, where) for spec, seeds, where, _ in plans], args.scale, args.jobs)
    for spec, seeds, where, out_dir in plans:
        _report(spec, args.scale, seeds, where, out_dir, t0)
    return 0


def _study(spec, args) -> int:
    """An analytic study (iif/studies): a computation, not a sweep of runs; exit status 1 when a claim fails."""
    if args.seeds:
        spec.seeds = [int(s) for s in args.seeds.split(",")]
    out_dir = Path(args.out or Path("outputs") / spec.name)
    t0 = time.perf_counter()
    report, passed = importlib.import_module(spec.study).run(spec, args.scale, out_dir)
    print("\n" + report)
    print(f"wrote {out_dir}/{{{','.join(sorted(f.name for f in out_dir.iterdir() if f.is_file()))}}} in "
          f"{time.perf_counter() - t0:.0f} s")
    return 0 if passed else 1


def _plan(p, spec, args, several: bool = False):
    """One artifact's runs: the spec with the methods of ``--methods``, its seeds, ``{setting: (runs_dir, extra
    overrides)}`` for the settings of ``--settings``, and its output folder. With several artifacts a name of
    ``--methods``/``--settings`` may be another artifact's, but each artifact must keep one."""
    def chosen(flag: str, names: list[str], have: list[str]) -> list[str]:
        unknown = [n for n in names if n not in have]
        if unknown and not several:
            p.error(f"unknown {flag[2:-1]} '{unknown[0]}'; the spec has {have}")
        if several and len(unknown) == len(names):
            p.error(f"{spec.name} has none of the {flag[2:]} {', '.join(names)}: it has {have}")
        return [n for n in have if n in names]  # the spec's order

    if args.methods:
        spec.methods = chosen("--methods", args.methods.split(","), list(spec.methods))
    settings = settings_of(spec)
    if args.settings:
        keep = chosen("--settings", args.settings.split(","), list(settings))
        settings = {k: v for k, v in settings.items() if k in keep}
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(spec.seeds)
    out_dir = Path(args.out or Path("outputs") / spec.name)
    where = {setting: (out_dir / "runs" / setting if setting else out_dir / "runs", [*overrides, *args.overrides])
             for setting, overrides in settings.items()}
    return spec, seeds, where, out_dir


def _report(spec, scale: str, seeds: list[int], where: dict[str, tuple[Path, list[str]]], out_dir: Path,
            t0: float) -> None:
    """Aggregate one artifact's run directories: ``table.md|csv`` (mean ± s.e. over seeds), its figures, the
    claims' PASS/FAIL lines, printed too."""
    metrics = list(spec.metrics)
    tables, sections, all_rows = {}, [], []
    for setting, (runs_dir, extra) in where.items():
        runs = [r for r in load_runs(runs_dir) if r["method"] in spec.methods and r["seed"] in seeds
                and not Path(r["run_dir"]).parent.name.startswith("tune_")]
        if not runs:
            raise SystemExit(f"iif-reproduce: error: no finished runs under {runs_dir}")
        rows = aggregate(runs, "method", metrics, order=list(spec.methods))  # rows carry their run_dirs
        tables[setting] = {m: {r["method"]: r[m] for r in rows if m in r} for m in metrics}
        suffix = f"_{setting}" if setting else ""
        make_figure(spec, scale, rows, out_dir / f"figure{suffix}.png", [*spec.scales[scale], *extra])
        if spec.get("curve"):
            tables[setting]["curve"] = curve(spec, runs, out_dir)
        label = f" ({setting})" if setting else ""
        note = ""
        if spec.get("facts"):  # the same on every run of the setting (e.g. the reference): one line
            facts = {k: runs[0][k] for k in spec.facts if k in runs[0]}
            note += f"\n{spec.get('facts_title', 'facts')}{label}: " + ", ".join(f"{k} = {v:.4g}" for k, v in facts.items())
        failed = runs_dir / "failed.json"
        if failed.exists():
            note += f"\nfailed{label} (methods allowed to fail, spec may_fail): " + ", ".join(json.loads(failed.read_text()))
        tuned = runs_dir / "tuned.json"
        if tuned.exists():
            note += f"\ntuned{label}: " + ", ".join(f"{m}: {o}" for m, o in json.loads(tuned.read_text()).items())
        sections.append((setting, rows, note))
        all_rows.append((setting, rows))
    md = write_combined(all_rows, metrics, out_dir, list(spec.get("common_metrics") or []), list(spec.methods))
    if spec.get("rank_by"):  # one metric or a list: a ranking table each, all in ranking.md
        by = [spec.rank_by] if isinstance(spec.rank_by, str) else list(spec.rank_by)
        ranked = "\n".join(ranking(tables, m, spec.metrics[m], list(spec.methods)) for m in by)
        (out_dir / "ranking.md").write_text(ranked)
        md += "\n" + ranked
    lines = check_claims(spec, tables, scale)
    notes = "".join(note for _, _, note in sections)
    curve_note = ""
    for setting, table in tables.items():
        if "curve" in table:
            cv = table["curve"]
            curve_note += (f"\n{spec.curve.metric} per iteration: curve.csv, curve.png; first {cv['first']:.4g}, last "
                           f"{cv['last']:.4g}, rose beyond noise in {cv['rise_frac']:.0%} of steps "
                           f"({cv['n_seeds']} seeds)\n")
    scale_note = ((spec.get("scale_notes") or {}).get(scale) or "").strip()
    report = (f"# {spec.title}\n\nscale={scale}, seeds={seeds}, mean ± standard error over seeds\n\n"
              + (f"**{scale_note}**\n\n" if scale_note else "") + f"{md}\n"
              + "\n".join(lines) + "\n" + curve_note + notes + "\n")
    (out_dir / "table.md").write_text(report)
    print("\n" + report)
    print(f"wrote {out_dir}/table.md, table.csv, figures in {time.perf_counter() - t0:.0f} s")


def ranking(tables: dict[str, dict], metric: str, direction: str, methods: list[str]) -> str:
    """Rank the methods within each setting by ``metric`` (1: best; ``direction`` lower or higher is better): a
    markdown table. Ties share the better rank; a method without the metric in a setting is left out of that
    setting's ranking.

    Two summaries per method: its mean rank over the settings it has, and its win rate, the mean over the other
    methods of the fraction of the settings both have where it is better (ties count half). The mean rank of a
    method that runs on only some settings (``only_on``) averages other settings than the rest's; the win rate
    compares every pair on the settings they share, so the rows are ordered by it (mean rank breaks ties)."""
    settings = [k for k in tables if k]
    sign = -1.0 if direction == "higher" else 1.0
    scores: dict[str, dict[str, float]] = {}  # setting -> method -> value, lower is better
    for setting in settings:
        values = tables[setting].get(metric, {})
        scores[setting] = {m: sign * v for m, v in values.items() if m in methods and math.isfinite(v)}
    ranks = {m: {s: 1 + sum(v < sc[m] for v in sc.values()) for s, sc in scores.items() if m in sc} for m in methods}
    mean = {m: sum(r.values()) / len(r) for m, r in ranks.items() if r}
    win: dict[str, float] = {}
    for m in mean:
        fractions = []
        for other in mean:
            shared = [sc for sc in scores.values() if m in sc and other in sc]
            if other != m and shared:
                fractions.append(sum(1.0 if sc[m] < sc[other] else 0.5 if sc[m] == sc[other] else 0.0
                                     for sc in shared) / len(shared))
        win[m] = sum(fractions) / len(fractions) if fractions else math.nan
    order = sorted(mean, key=lambda m: (-win[m] if math.isfinite(win[m]) else math.inf, mean[m]))
    head = (f"ranking by {metric} ({direction} is better) within each setting; mean rank over the settings a method "
            f"ran on; win rate: mean over the other methods of the share of shared settings where it is better "
            f"(ties half), the order\n\n")
    rows = ["| method | win rate | mean rank | " + " | ".join(settings) + " |",
            "|---|---|---|" + "---|" * len(settings)]
    rows += [f"| {m} | {win[m]:.2f} | {mean[m]:.2f} | " + " | ".join(str(ranks[m].get(s, "–")) for s in settings)
             + " |" for m in order]
    return head + "\n".join(rows) + "\n"


def write_combined(settings_rows: list[tuple[str, list[dict]]], metrics: list[str], out_dir: Path,
                   common: list[str] = (), order: list[str] = ()) -> str:
    """One row per method (in ``order``, then first seen), the metrics of each setting as columns
    ``<setting>/<metric>`` (plain names without settings): ``table.md`` and ``table.csv`` (first column ``method``).
    ``common`` metrics (e.g. training time and memory) get one column each after them: the mean over the settings
    (those the method ran on, ``only_on``), its standard error ``sqrt(sum se^2) / n_settings``."""
    if len(settings_rows) == 1 and not settings_rows[0][0]:
        return write_tables(settings_rows[0][1], "method", metrics, out_dir)
    merged: dict[str, dict] = {}
    columns = []
    pooled: dict[tuple[str, str], list[tuple[float, float, int]]] = {}
    for setting, rows in settings_rows:
        for r in rows:
            row = merged.setdefault(r["method"], {"method": r["method"], "n": r["n"], "_counts": {}})
            row["n"] = min(row["n"], r["n"])
            for m in metrics:
                if m not in r:
                    continue
                if m in common:
                    pooled.setdefault((r["method"], m), []).append((r[m], r[f"{m}_se"], r["_counts"][m]))
                    continue
                row[f"{setting}/{m}"], row[f"{setting}/{m}_se"] = r[m], r[f"{m}_se"]
                row["_counts"][f"{setting}/{m}"] = r["_counts"][m]
        columns += [f"{setting}/{m}" for m in metrics if m not in common]
    for (method, m), values in pooled.items():
        row = merged[method]
        row[m] = sum(v for v, _, _ in values) / len(values)
        row[f"{m}_se"] = math.sqrt(sum(se ** 2 for _, se, _ in values)) / len(values)
        row["_counts"][m] = min(c for _, _, c in values)
    columns += [m for m in metrics if m in common]
    rank = {m: i for i, m in enumerate(order)}
    rows = sorted(merged.values(), key=lambda r: rank.get(r["method"], len(rank)))  # stable: first seen after
    return write_tables(rows, "method", columns, out_dir)


if __name__ == "__main__":
    sys.exit(main())
