"""Tables from run directories: read each run's ``metrics.json`` and ``config.yaml`` (never the W&B API, so it
works offline), group the runs by the options that differ between them, and aggregate over seeds as
mean ± standard error. ``iif-reproduce`` and ``iif-table`` share this code.

    iif-table                                            # every finished run under outputs/, Markdown to stdout
    iif-table outputs/multirun/2026-11-22 --out outputs/my_table       # + table.md, table.csv there
    iif-table outputs/figure1/runs --metrics mode_tv,sc_loss --group-by method

A run directory is a folder holding ``metrics.json`` (written last by ``iif-train``, so it marks a finished run)
and, beside it, the resolved ``config.yaml``. The options of a run are the chosen config names that
``metrics.json`` records (``experiment``, ``method``, ``base_model``) and every leaf of ``config.yaml`` as a dotted
key (``method.kl_weight``, ``iterations``), except the seed (what a table averages over) and keys that do not change
what a run computes (:data:`NOT_OPTIONS`). The grouping columns are the fewest options, chosen names first and
shallow keys before deep ones, that separate the runs into the same groups as all differing options together:
runs of ``method=iif`` and ``method=reward_only`` differ in ``method.use_rnd`` too, but ``method`` already tells
them apart, so the table has one column ``method``; an override ``method.kl_weight=0.1`` on some ``iif`` runs adds
a column ``method.kl_weight``.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import yaml

# What a table shows when --metrics is not given (those present in the runs, in this order).
DEFAULT_METRICS = ("mode_tv", "energy_distance", "top_mode_frac", "reward_mean", "sc_loss", "kl_path", "wall_s",
                   "base_nfe", "sample_nfe", "peak_mem_mb")
# Chosen config names that metrics.json records; they name a group better than the config leaves they imply.
CHOICES = ("experiment", "method", "base_model")
# Never grouping options: the seed is averaged over; the rest (and everything under them) say where results and
# caches go, how a run is logged, where and on what it ran (launcher, resources, site), or how many threads it
# used, not what it computes. `debug`: run directories written before debug=fast became a Hydra preset list its
# overrides there, already applied to the leaves they name.
NOT_OPTIONS = ("seed", "logger", "debug", "torch_threads", "cache_dir", "launcher", "resources", "site")
# Fields of metrics.json that identify a run rather than measure it.
BOOKKEEPING = ("seed", "iterations", *CHOICES)
MISSING = None  # the value of an option a run does not have (shown as "—")


class TableError(ValueError):
    """Input that cannot make a table (no runs, unknown metric or option); the message names the cause."""


# ---------------------------------------------------------------------------------------------- reading runs
def flatten(tree: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}, "c": [1, 2]}`` -> ``{"a.b": 1, "c": "[1, 2]"}`` (lists as JSON text: hashable, printable)."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, dict)) else value
    return flat


def load_runs(root: str | Path) -> list[dict]:
    """Every finished run below ``root`` (``root`` itself may be a run directory): its ``metrics.json`` fields,
    ``"run_dir"``, and ``"config"``, the flattened ``config.yaml`` (``{}`` where there is none). A ``root`` that
    does not exist holds no runs."""
    runs = []
    for path in sorted(Path(root).rglob("metrics.json")):
        config_path = path.parent / "config.yaml"
        try:
            row = json.loads(path.read_text())
            row["config"] = flatten(yaml.safe_load(config_path.read_text()) or {}) if config_path.exists() else {}
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise TableError(f"cannot read the run directory {path.parent}: {type(e).__name__}: {e}") from e
        row["run_dir"] = str(path.parent)
        runs.append(row)
    return runs


def unfinished_runs(root: str | Path) -> list[str]:
    """Run directories below ``root`` that started (``metrics.jsonl``) but have no ``metrics.json`` yet."""
    return sorted(str(p.parent) for p in Path(root).rglob("metrics.jsonl")
                  if not (p.parent / "metrics.json").exists())


def option_value(run: dict, key: str):
    """The value of option ``key`` in ``run``: a ``metrics.json`` field, else a dotted ``config.yaml`` key."""
    if key in run and key not in ("config", "run_dir"):
        return run[key]
    return run.get("config", {}).get(key, MISSING)


def run_options(run: dict) -> dict:
    """The options of one run (see the module docstring): chosen names, then the config leaves."""
    options = {k: run[k] for k in CHOICES if k in run}
    for key, value in run.get("config", {}).items():
        if key.split(".")[0] not in NOT_OPTIONS:
            options[key] = value
    return options


def varying_options(runs: list[dict]) -> list[str]:
    """The fewest options that split ``runs`` into the same groups as all their differing options together.

    Greedy over the options in order of preference (the chosen names of :data:`CHOICES`, then config keys by
    depth, ``_target_`` first, then by name): an option is kept if it splits some group of the options kept so
    far. A key that only varies together with a kept one (``method.use_rnd`` with ``method``,
    ``method.iterations`` with ``iterations``) therefore adds no column.
    """
    options = [run_options(r) for r in runs]

    def preference(key: str):
        return (CHOICES.index(key) if key in CHOICES else len(CHOICES), key.count("."),
                not key.endswith("_target_"), key)

    chosen, groups = [], 1
    for key in sorted(set().union(*options), key=preference):
        n = _n_groups(options, chosen + [key])
        if n > groups:
            chosen.append(key)
            groups = n
    return chosen


def covered_options(runs: list[dict], chosen: list[str]) -> dict[str, list[str]]:
    """For each config key among ``chosen`` (a column), the other options that vary but add no split once the
    columns up to it are known, e.g. ``{"iterations": ["method.iterations"]}``: what that column stands for."""
    options = [run_options(r) for r in runs]
    covered: dict[str, list[str]] = {k: [] for k in chosen if k not in CHOICES}
    for key in sorted(set().union(*options) - set(chosen)):
        if _n_groups(options, [key]) == 1:
            continue  # the same in every run
        for j, column in enumerate(chosen):
            if _n_groups(options, chosen[:j + 1] + [key]) == _n_groups(options, chosen[:j + 1]):
                if column in covered:
                    covered[column].append(key)
                break
    return {k: v for k, v in covered.items() if v}


def default_metrics(runs: list[dict]) -> list[str]:
    """:data:`DEFAULT_METRICS` that some run has; failing that, every numeric ``metrics.json`` field."""
    present = [m for m in DEFAULT_METRICS if any(m in r for r in runs)]
    if present:
        return present
    return sorted({k for r in runs for k, v in r.items() if _is_number(v) and k not in BOOKKEEPING})


def check_columns(runs: list[dict], by: list[str], metrics: list[str]) -> None:
    """Raise :class:`TableError` naming the first grouping option or metric that no run has, or a metric that is
    not a number."""
    for key in by:
        if all(option_value(r, key) is MISSING for r in runs):
            raise TableError(f"no run has the option '{key}' to group by; options that differ between the runs: "
                             f"{', '.join(varying_options(runs)) or 'none'}")
    for m in metrics:
        values = [r[m] for r in runs if r.get(m) is not None]
        if not values:
            present = sorted({k for r in runs for k, v in r.items() if _is_number(v) and k not in BOOKKEEPING})
            raise TableError(f"no run has the metric '{m}'; metrics of these runs: {', '.join(present)}")
        if not all(_is_number(v) for v in values):
            raise TableError(f"metric '{m}' is not a number in every run (e.g. {values[0]!r}); it cannot be averaged")


# ---------------------------------------------------------------------------------------------- aggregation
def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error (``std / sqrt(n)``, with the n-1 std; 0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def aggregate(runs: list[dict], by: str | list[str], metrics: list[str], order: list | None = None) -> list[dict]:
    """One row per group of runs with equal values of the option(s) ``by``:
    ``{<by...>, n, run_dirs, <metric>: mean, <metric>_se: se}`` over the runs of the group that have the metric
    (a metric no run of the group has is left out of the row).

    Rows follow ``order`` (values of the first option of ``by``), then the natural order of the values.
    """
    by = [by] if isinstance(by, str) else list(by)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        groups[tuple(_hashable(option_value(r, k)) for k in by)].append(r)
    order = list(order or [])

    def rank(key: tuple):
        first = order.index(key[0]) if by and key[0] in order else len(order)
        return first, [_sort_key(v) for v in key]

    rows = []
    for key in sorted(groups, key=rank):
        members = groups[key]
        row = {**dict(zip(by, key)), "n": len(members), "run_dirs": [r.get("run_dir") for r in members],
               "_counts": {}}
        for m in metrics:
            vals = [float(r[m]) for r in members if r.get(m) is not None]
            if vals:
                row[m], row[f"{m}_se"] = mean_se(vals)
                row["_counts"][m] = len(vals)
        rows.append(row)
    return rows


def to_markdown(rows: list[dict], by: str | list[str], metrics: list[str]) -> str:
    """A Markdown table: one column per option of ``by``, ``n``, then ``mean ± s.e.`` per metric (the mean alone
    where the group has one value of it, ``—`` where it has none)."""
    by = [by] if isinstance(by, str) else list(by)
    header = [*by, "n", *metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [_cell(r[k]) for k in by] + [str(r["n"])]
        for m in metrics:
            if m not in r:
                cells.append("—")
            elif r.get("_counts", {}).get(m, 2) < 2:
                cells.append(_fmt(r[m]))
            else:
                cells.append(f"{_fmt(r[m])} ± {_fmt(r[m + '_se'], 2)}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict], by: str | list[str], metrics: list[str]) -> str:
    """CSV text: the options of ``by``, ``n``, and for each metric two columns ``<metric>``, ``<metric>_se`` (full
    precision; empty where the group has no value)."""
    by = [by] if isinstance(by, str) else list(by)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([*by, "n"] + [c for m in metrics for c in (m, f"{m}_se")])
    for r in rows:
        w.writerow([("" if r[k] is MISSING else r[k]) for k in by] + [r["n"]]
                   + [r.get(c, "") for m in metrics for c in (m, f"{m}_se")])
    return buf.getvalue()


def write_tables(rows: list[dict], by: str | list[str], metrics: list[str], out_dir: str | Path) -> str:
    """Write ``table.md`` (mean ± s.e.) and ``table.csv`` (separate columns) into ``out_dir``; return the
    Markdown."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = to_markdown(rows, by, metrics)
    (out_dir / "table.md").write_text(md)
    (out_dir / "table.csv").write_text(to_csv(rows, by, metrics))
    return md


def _fmt(x: float, digits: int = 4) -> str:
    return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:.0f}"


def _cell(value) -> str:
    return "—" if value is MISSING else str(value)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _n_groups(options: list[dict], keys: list[str]) -> int:
    """Number of distinct value tuples of ``keys`` over the runs' ``options``."""
    return len({tuple(_hashable(o.get(k, MISSING)) for k in keys) for o in options})


def _hashable(v):
    return json.dumps(v, sort_keys=True) if isinstance(v, (list, dict)) else v


def _sort_key(v):
    """Numbers before text, missing values last, so mixed columns still sort."""
    return (0, v, "") if _is_number(v) else (2, 0, "") if v is MISSING else (1, 0, str(v))


# ---------------------------------------------------------------------------------------------- iif-table
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="iif-table", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="*", default=["outputs"],
                   help="folders searched (recursively) for run directories; default: outputs")
    p.add_argument("--metrics", default=None,
                   help="comma-separated metrics.json fields (default: those of "
                        f"{', '.join(DEFAULT_METRICS)} that the runs have)")
    p.add_argument("--group-by", default=None,
                   help="comma-separated options to group by, instead of those that differ between the runs: "
                        "metrics.json fields (method, base_model, experiment) or dotted config keys "
                        "(method.kl_weight)")
    p.add_argument("--out", default=None,
                   help="folder to write table.md and table.csv into (default: only print the Markdown)")
    args = p.parse_args(argv)
    try:
        md, n_runs = make_table(args.paths, _split(args.metrics), _split(args.group_by), args.out)
    except TableError as e:
        print(f"iif-table: error: {e}", file=sys.stderr)
        return 2
    print(md, end="")
    if args.out:
        print(f"wrote {args.out}/table.md and table.csv ({n_runs} runs)", file=sys.stderr)
    return 0


def make_table(paths: list[str], metrics: list[str] | None = None, group_by: list[str] | None = None,
               out: str | None = None) -> tuple[str, int]:
    """What ``iif-table`` does: load, group, aggregate, and write when ``out`` is given; returns (Markdown, number
    of runs)."""
    for path in paths:
        if not Path(path).exists():
            raise TableError(f"path '{path}' does not exist")
    runs, seen = [], set()
    for path in paths:
        for r in load_runs(path):
            key = Path(r["run_dir"]).resolve()
            if key not in seen:  # overlapping paths list a run once
                seen.add(key)
                runs.append(r)
    if not runs:
        started = [d for path in paths for d in unfinished_runs(path)]
        hint = f" ({len(started)} unfinished, e.g. {started[0]})" if started else ""
        raise TableError(f"no finished run directories (metrics.json) under {', '.join(paths)}{hint}")
    metrics = metrics or default_metrics(runs)
    by = group_by if group_by is not None else (varying_options(runs) or [k for k in CHOICES
                                                                          if any(k in r for r in runs)])
    check_columns(runs, by, metrics)
    _warn_repeated_seeds(runs, by)
    if group_by is None:
        for column, others in covered_options(runs, by).items():
            print(f"iif-table: note: column '{column}' also stands for {', '.join(others)} (they vary with it)",
                  file=sys.stderr)
    rows = aggregate(runs, by, metrics)
    md = write_tables(rows, by, metrics, out) if out else to_markdown(rows, by, metrics)
    return md, len(runs)


def _warn_repeated_seeds(runs: list[dict], by: list[str]) -> None:
    """Two runs of one group with the same seed are repeats, not independent seeds: say so (they still count)."""
    seen: dict[tuple, str] = {}
    for r in runs:
        key = (tuple(_hashable(option_value(r, k)) for k in by), r.get("seed"))
        if key in seen:
            print(f"iif-table: warning: {r['run_dir']} repeats seed {r.get('seed')} of {seen[key]} in the same "
                  f"group; both are averaged", file=sys.stderr)
        else:
            seen[key] = r["run_dir"]


def _split(text: str | None) -> list[str] | None:
    return [s.strip() for s in text.split(",") if s.strip()] if text else None


if __name__ == "__main__":
    sys.exit(main())
