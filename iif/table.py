"""Tables from run directories: read each run's ``metrics.json`` (never the W&B API, so it works offline), group
by an option, and aggregate over seeds as mean ± standard error."""
from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path


def load_runs(root: str | Path) -> list[dict]:
    """``metrics.json`` of every finished run below ``root`` (with its directory under ``"run_dir"``)."""
    runs = []
    for path in sorted(Path(root).rglob("metrics.json")):
        row = json.loads(path.read_text())
        row["run_dir"] = str(path.parent)
        runs.append(row)
    return runs


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error (``std / sqrt(n)``, with the n-1 std; 0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def aggregate(runs: list[dict], by: str, metrics: list[str], order: list[str] | None = None) -> list[dict]:
    """One row per value of ``by``: ``{by, n, <metric>: mean, <metric>_se: se}``."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in runs:
        groups[r[by]].append(r)
    keys = [k for k in (order or []) if k in groups] + sorted(k for k in groups if k not in (order or []))
    rows = []
    for key in keys:
        row = {by: key, "n": len(groups[key])}
        for m in metrics:
            vals = [float(r[m]) for r in groups[key] if r.get(m) is not None]
            if vals:
                row[m], row[f"{m}_se"] = mean_se(vals)
        rows.append(row)
    return rows


def _fmt(x: float, digits: int = 4) -> str:
    return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:.0f}"


def write_tables(rows: list[dict], by: str, metrics: list[str], out_dir: str | Path) -> str:
    """Write ``table.md`` (mean ± s.e.) and ``table.csv`` (separate columns); return the Markdown."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    header = [by, "n", *metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [str(r[by]), str(r["n"])]
        cells += [f"{_fmt(r[m])} ± {_fmt(r[m + '_se'], 2)}" if m in r else "—" for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    md = "\n".join(lines) + "\n"
    (out_dir / "table.md").write_text(md)
    with (out_dir / "table.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([by, "n"] + [c for m in metrics for c in (m, f"{m}_se")])
        for r in rows:
            w.writerow([r[by], r["n"]] + [r.get(c, "") for m in metrics for c in (m, f"{m}_se")])
    return md
