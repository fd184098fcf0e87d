"""An artifact's report from its finished run directories (``iif-reproduce``'s last step): ``table.md|csv`` (mean ±
standard error over seeds, a column group per setting), the figures, the per-iteration curve, the ranking of the
methods within each setting, and the paper's claims checked on the tables as ``PASS``/``FAIL`` lines."""
from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import torch

from iif.specs import with_experiment
from iif.table import aggregate, load_runs, write_tables

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


def report_artifact(spec, scale: str, seeds: list[int], where: dict[str, tuple[Path, list[str]]], out_dir: Path,
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
            note += (f"\n{spec.get('facts_title', 'facts')}{label}: "
                     + ", ".join(f"{k} = {v:.4g}" for k, v in facts.items()))
        failed = runs_dir / "failed.json"
        if failed.exists():
            note += (f"\nfailed{label} (methods allowed to fail, spec may_fail): "
                     + ", ".join(json.loads(failed.read_text())))
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
