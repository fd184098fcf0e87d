"""`iif-table` on hand-written run directories (config.yaml + metrics.json) with known numbers: the grouping by the
options that differ, mean ± standard error over seeds computed by hand, the Markdown and CSV contents, the CLI
and its errors."""
from __future__ import annotations

import csv
import io
import json
import math
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from iif.table import aggregate, covered_options, load_runs, varying_options

ROOT = Path(__file__).resolve().parent.parent

# (method, kl_weight or None for a method without it, seed, mode_tv, sc_loss or None, torch_threads, logger)
RUNS = [
    ("iif", 0.0, 0, 0.10, 4.0, None, "none"),
    ("iif", 0.0, 1, 0.20, 5.0, 1, "wandb"),     # bookkeeping differs: must not split the group
    ("iif", 0.0, 2, 0.60, 6.0, None, "none"),
    ("iif", 0.1, 0, 0.05, 4.5, None, "none"),   # an override on some iif runs: a column of its own
    ("iif", 0.1, 1, 0.15, 5.5, None, "none"),
    ("reward_only", 0.0, 0, 0.40, None, None, "none"),  # no sc_loss
    ("reward_only", 0.0, 1, 0.50, None, None, "none"),
    ("base", None, 0, 0.70, 9.0, None, "none"),  # one seed; no kl_weight option
]
LOGGERS = {"none": {"_target_": "iif.loggers.null.NullLogger"},
           "wandb": {"_target_": "iif.loggers.wandb_logger.WandbLogger", "mode": "offline"}}


def write_runs(root: Path, runs=RUNS) -> None:
    for method, kl, seed, tv, sc, threads, logger in runs:
        d = root / f"{method}_kl{kl}_seed{seed}"
        d.mkdir(parents=True)
        method_cfg = {"_target_": "iif.methods.base_only.BaseOnly"} if method == "base" else {
            "_target_": "iif.methods.iif.IIF", "kl_weight": kl, "use_rnd": method == "iif",
            "acceptance": {"values": [0.3], "boundaries": []}}
        config = {"seed": seed, "iterations": 30, "torch_threads": threads, "cache_dir": "outputs/cache",
                  "sampler": {"_target_": "iif.samplers.ddpm.DDPMSampler", "n_steps": 100},
                  "method": method_cfg, "logger": LOGGERS[logger], "debug": {"overrides": {}}}
        (d / "config.yaml").write_text(yaml.safe_dump(config))
        metrics = {"mode_tv": tv, "wall_s": 1.0 + seed, "iterations": 30, "seed": seed, "method": method,
                   "base_model": "gmm_exact", "experiment": "toy2d"}
        if sc is not None:
            metrics["sc_loss"] = sc
        (d / "metrics.json").write_text(json.dumps(metrics))


def se(values: list[float]) -> float:
    """Standard error by the textbook formula (written out here, independent of iif.table)."""
    n = len(values)
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def table_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "iif.table", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_grouping_picks_the_options_that_differ(tmp_path):
    """method and method.kl_weight split the runs; seed is averaged over; torch_threads, logger (bookkeeping) and
    method.use_rnd (implied by method) add no column."""
    write_runs(tmp_path)
    runs = load_runs(tmp_path)
    assert len(runs) == 8
    assert varying_options(runs) == ["method", "method.kl_weight"]


def test_options_that_vary_together_make_one_column(tmp_path):
    """`iterations=10` vs 30 also changes the interpolated `method.iterations`: one column, the shallower key, and
    the other named as what it stands for."""
    for iterations in (10, 30):
        for seed in (0, 1):
            d = tmp_path / f"it{iterations}_s{seed}"
            d.mkdir()
            config = {"seed": seed, "iterations": iterations, "method": {"iterations": iterations, "kl_weight": 0.0}}
            (d / "config.yaml").write_text(yaml.safe_dump(config))
            (d / "metrics.json").write_text(json.dumps({"method": "iif", "seed": seed, "mode_tv": 0.1}))
    runs = load_runs(tmp_path)
    assert varying_options(runs) == ["iterations"]
    assert covered_options(runs, ["iterations"]) == {"iterations": ["method.iterations"]}
    proc = table_cli(str(tmp_path), cwd=tmp_path)
    assert proc.stdout.splitlines()[0] == "| iterations | n | mode_tv |"
    assert "column 'iterations' also stands for method.iterations" in proc.stderr


def test_mean_and_standard_error_per_group(tmp_path):
    write_runs(tmp_path)
    rows = aggregate(load_runs(tmp_path), ["method", "method.kl_weight"], ["mode_tv", "sc_loss"])
    got = {(r["method"], r["method.kl_weight"]): r for r in rows}
    assert list(got) == [("base", None), ("iif", 0.0), ("iif", 0.1), ("reward_only", 0.0)]
    iif = got[("iif", 0.0)]
    assert iif["n"] == 3
    # mean (0.1 + 0.2 + 0.6) / 3 = 0.3; deviations -0.2, -0.1, 0.3: var = 0.14 / 2 = 0.07, se = sqrt(0.07 / 3)
    assert iif["mode_tv"] == pytest.approx(0.3, rel=1e-12)
    assert iif["mode_tv_se"] == pytest.approx(math.sqrt(0.07 / 3), rel=1e-12)
    assert iif["sc_loss"] == pytest.approx(5.0) and iif["sc_loss_se"] == pytest.approx(math.sqrt(1 / 3))
    kl = got[("iif", 0.1)]  # 0.05, 0.15: mean 0.1, se = 0.05
    assert (kl["n"], kl["mode_tv"], kl["mode_tv_se"]) == (2, pytest.approx(0.1), pytest.approx(0.05))
    ro = got[("reward_only", 0.0)]
    assert ro["mode_tv"] == pytest.approx(0.45) and ro["mode_tv_se"] == pytest.approx(0.05)
    assert "sc_loss" not in ro  # no run of the group has it
    assert got[("base", None)]["n"] == 1 and got[("base", None)]["mode_tv_se"] == 0.0


def test_cli_writes_markdown_and_csv(tmp_path):
    runs_dir, out = tmp_path / "runs", tmp_path / "table"
    write_runs(runs_dir)
    proc = table_cli(str(runs_dir), "--metrics", "mode_tv,sc_loss", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    md = (out / "table.md").read_text()
    assert proc.stdout == md
    assert md.splitlines() == [
        "| method | method.kl_weight | n | mode_tv | sc_loss |",
        "|---|---|---|---|---|",
        "| base | — | 1 | 0.7 | 9 |",                               # one seed: no ± 0
        "| iif | 0.0 | 3 | 0.3 ± 0.15 | 5 ± 0.58 |",                # se sqrt(0.07/3) = 0.1528, sqrt(1/3) = 0.577
        "| iif | 0.1 | 2 | 0.1 ± 0.05 | 5 ± 0.5 |",
        "| reward_only | 0.0 | 2 | 0.45 ± 0.05 | — |",
    ]
    rows = list(csv.DictReader(io.StringIO((out / "table.csv").read_text())))
    assert list(rows[0]) == ["method", "method.kl_weight", "n", "mode_tv", "mode_tv_se", "sc_loss", "sc_loss_se"]
    by_key = {(r["method"], r["method.kl_weight"]): r for r in rows}
    assert by_key[("base", "")]["n"] == "1"
    r = by_key[("iif", "0.0")]
    assert float(r["mode_tv"]) == pytest.approx(0.3, rel=1e-12)
    assert float(r["mode_tv_se"]) == pytest.approx(se([0.1, 0.2, 0.6]), rel=1e-12)
    assert float(r["sc_loss_se"]) == pytest.approx(se([4.0, 5.0, 6.0]), rel=1e-12)
    assert by_key[("reward_only", "0.0")]["sc_loss"] == ""


def test_cli_defaults_group_by_and_stdout_only(tmp_path):
    """Default path outputs/, default metrics (those present), --group-by method pools the kl_weight variants; no
    --out: Markdown on stdout, no files."""
    write_runs(tmp_path / "outputs" / "multirun")
    proc = table_cli("--group-by", "method", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "| method | n | mode_tv | sc_loss | wall_s |"
    iif = next(l for l in lines if l.startswith("| iif "))
    # the five iif runs: mode_tv 0.1, 0.2, 0.6, 0.05, 0.15 -> mean 0.22; se by hand
    tvs = [0.10, 0.20, 0.60, 0.05, 0.15]
    assert iif.startswith(f"| iif | 5 | 0.22 ± {se(tvs):.2g} |")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outputs"]


def test_cli_clear_errors(tmp_path):
    write_runs(tmp_path / "runs")
    proc = table_cli(str(tmp_path / "nope"), cwd=tmp_path)
    assert proc.returncode == 2 and f"path '{tmp_path / 'nope'}' does not exist" in proc.stderr
    (tmp_path / "empty" / "started").mkdir(parents=True)
    (tmp_path / "empty" / "started" / "metrics.jsonl").write_text("")
    proc = table_cli(str(tmp_path / "empty"), cwd=tmp_path)
    assert proc.returncode == 2 and "no finished run directories" in proc.stderr and "1 unfinished" in proc.stderr
    proc = table_cli(str(tmp_path / "runs"), "--metrics", "mode_tv,fid", cwd=tmp_path)
    assert proc.returncode == 2 and "no run has the metric 'fid'" in proc.stderr and "mode_tv" in proc.stderr
    proc = table_cli(str(tmp_path / "runs"), "--group-by", "sampler.eta", cwd=tmp_path)
    assert proc.returncode == 2 and "no run has the option 'sampler.eta'" in proc.stderr
    assert proc.stdout == ""


def test_repeated_seed_is_reported(tmp_path):
    write_runs(tmp_path / "a", RUNS[:1])
    write_runs(tmp_path / "b", RUNS[:1])  # the same run again, in another sweep
    proc = table_cli(str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 0 and "repeats seed 0" in proc.stderr
    assert "| toy2d | iif | gmm_exact | 2 |" in proc.stdout  # nothing differs: labelled by the chosen names


def test_console_script_is_declared():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["iif-table"] == "iif.table:main"
