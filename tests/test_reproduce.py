"""`iif-reproduce` and the table code on synthetic run directories with known numbers."""
from __future__ import annotations

import csv
import json
import math

import torch

from iif.reproduce import main as reproduce
from iif.table import aggregate, load_runs, mean_se

METHODS = ["base", "iif", "reward_only", "cg", "cg_oracle", "pathwise", "vargrad", "dpok", "am", "topk"]


def _fake_runs(root, values: dict[str, list[float]]):
    for method, tvs in values.items():
        for seed, tv in enumerate(tvs):
            d = root / f"{method}_seed{seed}"
            d.mkdir(parents=True)
            metrics = {"method": method, "seed": seed, "mode_tv": tv, "energy_distance": 0.1, "reward_mean": -4.0,
                       "top_mode_frac": 0.6 if method == "reward_only" else 0.2, "sc_loss": 4.7, "wall_s": 1.0,
                       "base_nfe": 100, "sample_nfe": 100, "peak_mem_mb": 500.0}
            (d / "metrics.json").write_text(json.dumps(metrics))
            torch.save(torch.randn(50, 2, dtype=torch.float64), d / "samples.pt")


def test_mean_and_standard_error_by_hand():
    mean, se = mean_se([1.0, 2.0, 4.0])
    assert mean == 7 / 3
    assert se == math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2 / 3)
    assert mean_se([5.0]) == (5.0, 0.0)


def test_reproduce_aggregates_run_directories_and_checks_claims(tmp_path):
    values = {"base": [0.44, 0.45, 0.43], "iif": [0.05, 0.06, 0.04], "reward_only": [0.36, 0.37, 0.35],
              "cg": [0.43, 0.43, 0.43], "cg_oracle": [0.26, 0.27, 0.25], "pathwise": [0.08, 0.09, 0.07],
              "vargrad": [0.1, 0.1, 0.1], "dpok": [0.2, 0.2, 0.2], "am": [0.07, 0.07, 0.07],
              "topk": [0.12, 0.13, 0.11]}
    _fake_runs(tmp_path / "runs", values)
    # options before `--`, Hydra overrides after it (unused with --skip-runs, but parsed)
    assert reproduce(["figure1", "--skip-runs", "--seeds", "0,1,2", "--out", str(tmp_path), "--",
                      "iterations=20"]) == 0
    rows = {r["method"]: r for r in csv.DictReader((tmp_path / "table.csv").open())}
    assert list(rows) == METHODS  # the spec's order
    for method, tvs in values.items():
        mean, se = mean_se(tvs)
        assert float(rows[method]["mode_tv"]) == mean and float(rows[method]["mode_tv_se"]) == se
    report = (tmp_path / "table.md").read_text()
    assert report.count("PASS") == 5 and "FAIL" not in report
    assert (tmp_path / "figure.png").stat().st_size > 0


def test_a_failed_claim_is_reported_as_fail(tmp_path):
    values = {m: [0.3, 0.3] for m in METHODS}  # IIF no better than the rest
    _fake_runs(tmp_path / "runs", values)
    reproduce(["figure1", "--skip-runs", "--out", str(tmp_path), "--seeds", "0,1"])
    report = (tmp_path / "table.md").read_text()
    assert "FAIL: IIF reproduces the target's mode weighting" in report


def test_aggregate_groups_and_orders():
    runs = [{"method": "b", "x": 1.0}, {"method": "a", "x": 3.0}, {"method": "a", "x": 5.0}]
    rows = aggregate(runs, "method", ["x"], order=["b"])
    assert [r["method"] for r in rows] == ["b", "a"] and rows[1]["x"] == 4.0 and rows[1]["n"] == 2
    assert load_runs("/nonexistent") == []
