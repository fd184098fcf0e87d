"""``iif-reproduce ARTIFACT``: run the sweep of ``experiments/ARTIFACT/spec.yaml`` (read by iif/specs.py) through
Hydra, after checking every run's config, then aggregate the run directories (mean ± standard error over seeds) into
``outputs/ARTIFACT/table.md|csv`` and figures and check the paper's qualitative claims (iif/report.py). This module
plans and runs: the shared preparation, the tuning grids, the multiruns in a pool of ``--jobs``, ``--dry-run``.

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
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from omegaconf import OmegaConf

from iif.report import report_artifact
from iif.specs import load_spec, method_overrides, methods_of, run_overrides, settings_of
from iif.utils import ConfigError, RunError


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


def tune(spec, scale: str, runs_dir: Path, extra: list[str], threads: int | None = None,
         reevaluate: bool = False) -> dict[str, str]:
    """Choose the parameter of each method of ``spec.tune`` by its criterion: one run per grid value of the tuning
    method (``tune.<m>.method``, default ``m``) with the tuning seed (not one of the reported seeds), then the value
    whose ``metric`` is best. Runs sharing a grid are made once, and a grid value already :func:`finished` is not
    run again unless ``reevaluate``. Returns ``{method: "key=value"}``, also written to ``runs_dir/tuned.json``."""
    chosen, done = {}, set()
    for method, t in (spec.get("tune") or {}).items():
        if method not in spec.methods:  # not run (--methods)
            continue
        grid = tuning_grid(spec, scale, runs_dir, method)
        folder, values = grid["runs_dir"], [str(v) for v in t["values"]]
        if (grid["methods"][0], t.key) not in done:
            todo = grid_to_run(spec, scale, runs_dir, extra, method, reevaluate)
            if todo:
                run_sweep(spec, scale, extra=extra, threads=threads, **tuning_grid(spec, scale, runs_dir, method, todo))
        done.add((grid["methods"][0], t.key))
        scores = {v: json.loads((folder / f"v{v}" / "metrics.json").read_text())[t.metric] for v in values}
        pick = (min if t.get("goal", "min") == "min" else max)(scores, key=scores.get)
        chosen[method] = f"{t.key}={pick}"
        print(f"tuned {method}: {t.key}={pick} ({t.metric}: " + ", ".join(f"{v}: {x:.4g}" for v, x in scores.items())
              + ")", flush=True)
    if chosen:
        (runs_dir / "tuned.json").write_text(json.dumps(chosen, indent=1))
    return chosen


def tuning_grid(spec, scale: str, runs_dir: Path, method: str, values: list[str] | None = None) -> dict:
    """The multirun of ``method``'s tuning grid (``spec.tune``): :func:`run_sweep`'s arguments but ``extra`` and
    ``threads``: the grid method (``tune.<m>.method``, default ``m``) with its own sizes and every grid value (or
    ``values``), the tuning seed, run directories ``<runs_dir>/tune_<grid method>/v<value>``."""
    t = spec.tune[method]
    grid_method = t.get("method", method)
    values = ",".join(str(v) for v in (t["values"] if values is None else values))
    return {"seeds": [int(t.get("seed", 100))], "runs_dir": (runs_dir / f"tune_{grid_method}").resolve(),
            "methods": [grid_method], "subdir": f"v${{{t.key}}}",
            "method_overrides": [*method_overrides(spec, scale, grid_method), f"{t.key}={values}"]}


def grid_to_run(spec, scale: str, runs_dir: Path, extra: list[str], method: str, reevaluate: bool) -> list[str]:
    """The values of ``method``'s tuning grid to run: those not :func:`finished` (all with ``reevaluate``)."""
    grid = tuning_grid(spec, scale, runs_dir, method)
    return [str(v) for v in spec.tune[method]["values"] if reevaluate or not finished(
        grid["runs_dir"] / f"v{v}", spec, scale, extra, grid["methods"][0], grid["seeds"][0],
        tuning_grid(spec, scale, runs_dir, method, [v])["method_overrides"])]


def seeds_to_run(spec, scale: str, runs_dir: Path, extra: list[str], method: str, seeds: list[int],
                 own: list[str], reevaluate: bool) -> list[int]:
    """The ``seeds`` of ``method`` (its overrides ``own``) to run: those not :func:`finished` (all with
    ``reevaluate``)."""
    return [seed for seed in seeds
            if reevaluate or not finished(runs_dir / f"{method}_seed{seed}", spec, scale, extra, method, seed, own)]


def finished(run_dir: Path, spec, scale: str, extra: list[str], method: str, seed: int,
             own: list[str] = ()) -> bool:
    """Whether ``run_dir`` holds a finished run (its ``metrics.json``) of the artifact's run of ``method`` and
    ``seed`` (its method overrides ``own``), the same config but for the keys a resumed run may change
    (``iif.run_dir.RESUME_FREE``: threads, device, logger...). ``iif-reproduce`` does not start such a run again: it
    would resume from its final checkpoint and evaluate again, to the same numbers. A finished run of another config
    is started, and refuses to resume, naming the keys that differ."""
    from iif.config import compose
    from iif.run_dir import config_changes

    if not (run_dir / "metrics.json").exists() or not (run_dir / "config.yaml").exists():
        return False
    cfg, _ = compose([f"method={method}", f"seed={seed}", *run_overrides(spec, scale, extra, own)])
    saved = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
    return not config_changes(saved, OmegaConf.to_container(cfg, resolve=True))


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


def run_plans(plans: list[tuple], scale: str, jobs: int, reevaluate: bool = False) -> None:
    """The runs of one or more artifacts, ``plans``: ``(spec, seeds, settings)`` each, ``settings``
    ``{name: (runs_dir, extra overrides)}``. Pretraining and references first, setting after setting (what they
    share is made once); then the settings' tuning grids and method multiruns (each method with its own sizes,
    ``spec.method_overrides[scale]``, and its tuned value, after its setting's tuning) in one pool, setting after
    setting and artifact after artifact, so that one setting's last runs overlap the next one's first (a pool per
    setting left a core idle at each setting's end).

    With ``jobs > 1``, ``jobs`` multiruns at a time, each one process with one torch thread running its seeds in
    turn, so that one multirun's start-up overlaps another's compute (a joblib pool per multirun left the cores idle
    between multiruns). A multirun is a method (one start-up for its seeds) when there are at least two methods per
    job, else a single run (figure2's two methods: no core idles while one method's seeds run in turn).

    A run whose directory holds a finished run of its config is not started again (``reevaluate``: it is, and
    evaluates again), so a reproduction stopped part way, or one with a failed run, is completed by the same
    command."""
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
                                                     threads, failures[runs_dir.resolve()], reevaluate):
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
                    threads: int | None, failures: list[str], reevaluate: bool = False) -> list[tuple[str, object]]:
    """Submit one setting's tuning grid, then its untuned methods' multiruns, then its tuned ones (whose worker
    waits for the tuning, which was submitted before them: it has started or finished by then). Returns
    ``(label, future)`` pairs (the tuning's only when the spec tunes something); a run of a ``may_fail`` method that
    fails is appended to ``failures`` instead of raising. A run already :func:`finished` with its config is left
    out of its multirun (a multirun left with none is not started), unless ``reevaluate``."""
    tuned = set(spec.get("tune") or {})
    may_fail = set(spec.get("may_fail") or [])
    tasks = multiruns(spec, seeds, jobs)
    (runs_dir / "failed.json").unlink(missing_ok=True)
    tuning = pool.submit(tune, spec, scale, runs_dir, extra, threads, reevaluate)

    def run_task(method: str, task_seeds: list[int]) -> None:
        own = [*method_overrides(spec, scale, method), *([tuning.result()[method]] if method in tuned else [])]
        todo = seeds_to_run(spec, scale, runs_dir, extra, method, task_seeds, own, reevaluate)
        if not todo:
            print(f"iif-reproduce: {method} seed {','.join(map(str, task_seeds))} in {runs_dir} finished with this "
                  "config: not run again (--reevaluate to evaluate it again)", flush=True)
            return
        try:
            run_sweep(spec, scale, todo, runs_dir, extra, methods=[method], method_overrides=own, threads=threads)
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


def dry_run(plans: list[tuple], scale: str, jobs: int, checked: list[dict], reevaluate: bool = False) -> int:
    """``--dry-run``: what :func:`run_plans` would do, from the configs :func:`check_runs` composed: per setting the
    preparation, the tuning grids, each method's sizes and its runs already :func:`finished` (a tuned method's under
    the value its setting's last tuning chose, ``tuned.json``), then the command line of every multirun that would
    start (a tuned value as ``<tuned>``). Returns the number of runs that would start."""
    from iif.config import derived_sizes

    n_todo = n_done = n_multiruns = 0
    threads = 1 if jobs > 1 else None
    for (spec, seeds, where, _), configs in zip(plans, checked):
        tune = spec.get("tune") or {}
        for setting, (runs_dir, extra) in where.items():
            runs_dir = runs_dir.resolve()
            methods = methods_of(spec, setting)
            cfg, choices = configs[setting, methods[0]]
            label = "/".join(part for part in (spec.name, setting) if part)
            print(f"\n{label}: experiment {choices.get('experiment')}, {cfg.iterations} iterations, device "
                  f"{cfg.get('device', 'cpu')}, launcher {choices.get('hydra/launcher')}; runs in {runs_dir}")
            job = prepare_command(spec, scale, extra, runs_dir / "prepare", choices)
            print("  prepare (pretraining and references, cached): "
                  + ("in this process" if job is None else "one job of the launcher: " + shlex.join(job)))
            chosen = json.loads((runs_dir / "tuned.json").read_text()) if (runs_dir / "tuned.json").exists() else {}
            grids = {}  # tuned methods sharing a grid share its runs
            for method, t in tune.items():
                if method in methods:
                    grid = tuning_grid(spec, scale, runs_dir, method)
                    grids.setdefault((grid["methods"][0], t.key), (method, grid, []))[2].append(
                        f"{method} by {t.metric} ({t.get('goal', 'min')})")
            commands = []
            for (grid_method, key), (method, grid, chooses) in grids.items():
                values = [str(v) for v in tune[method]["values"]]
                todo = grid_to_run(spec, scale, runs_dir, extra, method, reevaluate)
                print(f"  tuning grid: {grid_method} {key} = {','.join(values)} (seed {grid['seeds'][0]}): "
                      f"{len(values)} runs; chooses {'; '.join(chooses)}" + _finished_note(len(values) - len(todo)))
                if todo:
                    commands.append(sweep_command(spec, scale, extra=extra, threads=threads,
                                                  **tuning_grid(spec, scale, runs_dir, method, todo)))
                n_todo, n_done = n_todo + len(todo), n_done + len(values) - len(todo)
            todo = {}
            for method in methods:
                known = method not in tune or method in chosen  # a tuned method's value is known once tuned
                own = [*method_overrides(spec, scale, method), *([chosen[method]] if method in tune and known else [])]
                todo[method] = seeds_to_run(spec, scale, runs_dir, extra, method, seeds, own, reevaluate or not known)
            width = max(map(len, methods))
            for method in methods:
                tuned = f"; {tune[method].key} tuned" if method in tune else ""
                print(f"  {method:<{width}}  seeds {','.join(map(str, seeds))}: "
                      f"{derived_sizes(configs[setting, method][0])}{tuned}"
                      + _finished_note(len(seeds) - len(todo[method])))
                n_todo, n_done = n_todo + len(todo[method]), n_done + len(seeds) - len(todo[method])
            own_spec = OmegaConf.merge(spec, {"methods": methods})
            for method, task_seeds in multiruns(own_spec, seeds, jobs):
                start = [seed for seed in task_seeds if seed in todo[method]]
                tuned = [f"{tune[method].key}=<tuned>"] if method in tune else []
                if start:
                    commands.append(sweep_command(spec, scale, start, runs_dir, extra, [method],
                                                  [*method_overrides(spec, scale, method), *tuned], threads=threads))
            print("".join(f"  + {shlex.join(cmd)}\n" for cmd in commands), end="")
            n_multiruns += len(commands)
    print(f"\niif-reproduce: dry run: {n_todo} runs in {n_multiruns} multiruns, {max(1, jobs)} at a time"
          + (f" ({n_done} more finished with this config: not run again)" if n_done else "")
          + "; every run's config composed and checked (sizes, pairing); nothing was run or written")
    return n_todo


def _finished_note(n: int) -> str:
    return f" ({n} finished: not run again)" if n else ""


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
    p.add_argument("--reevaluate", action="store_true",
                   help="start runs that finished with the same config again (they resume from their final "
                        "checkpoint and evaluate again); by default they are left as they are")
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
        dry_run(plans, args.scale, args.jobs, checked, args.reevaluate)
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
        run_plans([(spec, seeds, where) for spec, seeds, where, _ in plans], args.scale, args.jobs, args.reevaluate)
    for spec, seeds, where, out_dir in plans:
        report_artifact(spec, args.scale, seeds, where, out_dir, t0)
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


if __name__ == "__main__":
    sys.exit(main())
