"""`iif-reproduce` and the table code on synthetic run directories with known numbers."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
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


def _fake_image_runs(root, metrics_by_method: dict[str, list[dict]], jsonl: dict[str, list[list[dict]]] | None = None):
    for method, per_seed in metrics_by_method.items():
        for seed, metrics in enumerate(per_seed):
            d = root / f"{method}_seed{seed}"
            d.mkdir(parents=True)
            (d / "metrics.json").write_text(json.dumps({"method": method, "seed": seed, **metrics}))
            rows = (jsonl or {}).get(method, [[]] * len(per_seed))[seed]
            (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            torch.save(torch.rand(12, 1, 16, 16) * 2 - 1, d / "samples.pt")


def test_table1_has_a_column_group_per_setting_and_checks_claims_per_setting(tmp_path, fake_mnist):
    methods = ["base", "cg", "cg_oracle", "iif", "reward_only", "vargrad", "pathwise", "dpok", "am", "topk"]
    for setting, shift in (("single", 0.0), ("even", 1.0)):
        runs = {m: [{"reward_mean": -1.0 - shift + (0.5 if m == "vargrad" else 0.0) + 0.1 * s,
                     "fid": 3.0 + (1.0 if m == "vargrad" else 0.0) + s, "reward_gap": 0.2 if m == "iif" else 0.5}
                    for s in range(2)] for m in methods}
        _fake_image_runs(tmp_path / "runs" / setting, runs)
    assert reproduce(["table1", "--skip-runs", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader((tmp_path / "table.csv").open()))
    assert list(rows[0])[0] == "method" and [r["method"] for r in rows] == methods
    iif = next(r for r in rows if r["method"] == "iif")
    assert float(iif["single/reward_mean"]) == mean_se([-1.0, -0.9])[0]
    assert float(iif["even/reward_mean"]) == mean_se([-2.0, -1.9])[0]
    report = (tmp_path / "table.md").read_text()
    assert report.count("PASS") == 5 and "FAIL" not in report, report
    assert (tmp_path / "figure_single.png").stat().st_size > 0 and (tmp_path / "figure_even.png").exists()


def test_figure2_curve_mean_standard_error_and_rises(tmp_path, fake_mnist):
    # seed 0 falls 10, 8, 9 (a rise of 1 with s.e. 0.1 each: beyond noise), seed 1 falls 12, 10, 11
    curves = [[10.0, 8.0, 9.0], [12.0, 10.0, 11.0]]
    jsonl = {"iif": [[{"iteration": i + 1, "sc_loss": v, "sc_loss_se": 0.1} for i, v in enumerate(c)] for c in curves],
             "base": [[], []]}
    runs = {m: [{"sc_loss": 5.0, "consistency": 1.0 if m == "iif" else 9.0} for _ in range(2)] for m in ("base", "iif")}
    _fake_image_runs(tmp_path / "runs", runs, jsonl)
    assert reproduce(["figure2", "--skip-runs", "--out", str(tmp_path)]) == 0
    lines = (tmp_path / "curve.csv").read_text().splitlines()
    assert lines[0] == "iteration,sc_loss,sc_loss_se"
    it, mean, se = lines[3].split(",")
    assert int(it) == 3 and float(mean) == 10.0 and math.isclose(float(se), math.sqrt(2 * 0.1 ** 2) / 2)
    report = (tmp_path / "table.md").read_text()
    # the last iteration's rise of 1 > 2 x sqrt(2) x 0.0707: one rise in two steps
    assert "rose beyond noise in 50% of steps" in report
    assert "PASS: the SC loss falls" in report and "FAIL: the SC loss rises beyond noise" in report
    assert "PASS: IIF's posterior samples agree" in report
    assert (tmp_path / "curve.png").exists() and (tmp_path / "figure.png").exists()


def test_tuning_picks_the_grid_value_by_its_criterion(tmp_path, monkeypatch):
    """cg by the lowest fid, cg_oracle by the lowest reward_gap, from one shared grid of runs made once."""
    import iif.reproduce as rp

    spec = rp.load_spec("table1")
    values = [str(v) for v in spec.tune.cg["values"]]
    fid = dict(zip(values, [9.0, 4.0, 2.0, 3.0, 8.0][: len(values)]))
    gap = dict(zip(values, [0.1, 0.3, 0.5, 0.7, 0.9][: len(values)]))
    calls = []

    def fake_sweep(spec, scale, seeds, runs_dir, extra, methods=None, method_overrides=(), subdir=None,
                   threads=None):
        calls.append((methods, list(method_overrides), seeds))
        for v in values:
            d = runs_dir / f"v{v}"
            d.mkdir(parents=True, exist_ok=True)
            (d / "metrics.json").write_text(json.dumps({"fid": fid[v], "reward_gap": gap[v]}))

    monkeypatch.setattr(rp, "run_sweep", fake_sweep)
    chosen = rp.tune(spec, "ci", tmp_path, [])
    best_fid, best_gap = min(fid, key=fid.get), min(gap, key=gap.get)
    assert chosen == {"cg": f"method.guide.gamma={best_fid}", "cg_oracle": f"method.guide.gamma={best_gap}"}
    assert len(calls) == 1 and calls[0][0] == ["cg"] and calls[0][2] == [100]  # one grid, a seed not reported
    assert json.loads((tmp_path / "tuned.json").read_text()) == chosen

    # the grid's runs as iif-train leaves them (their resolved config), one of them lost: only that one runs again
    from omegaconf import OmegaConf

    from iif.config import compose

    for v in values:
        cfg, _ = compose(["method=cg", "seed=100", *rp.run_overrides(spec, "ci", [], [f"method.guide.gamma={v}"])])
        (tmp_path / "tune_cg" / f"v{v}" / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (tmp_path / "tune_cg" / f"v{values[1]}" / "metrics.json").unlink()
    assert rp.tune(spec, "ci", tmp_path, []) == chosen
    assert len(calls) == 2 and calls[1][1] == [f"method.guide.gamma={values[1]}"]
    assert rp.tune(spec, "ci", tmp_path, [], reevaluate=True) == chosen
    assert len(calls) == 3 and calls[2][1] == [f"method.guide.gamma={','.join(values)}"]


def test_figure2_smoke_scale_runs_the_pipeline(tmp_path, fake_mnist, cli_env):
    """`iif-reproduce figure2 --scale smoke`: pretraining, both methods, per-iteration evaluations, the curve."""
    import os
    import subprocess
    import sys

    env = {**cli_env, "IIF_DATA": os.environ["IIF_DATA"]}
    out = subprocess.run([sys.executable, "-m", "iif.reproduce", "figure2", "--scale", "smoke", "--seeds", "0",
                          "--out", str(tmp_path), "--", "logger=none"], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "curve.csv").read_text().count("\n") == 1 + 2  # header + 2 iterations of debug=fast
    assert "the SC loss falls" in (tmp_path / "table.md").read_text()


test_figure2_smoke_scale_runs_the_pipeline = pytest.mark.slow(test_figure2_smoke_scale_runs_the_pipeline)


# hub weights cannot be loaded offline: a scale that names them is built with tiny random models of the same shape
OFFLINE_MODELS = ["base_model.pretrained=tiny", "base_model.latent_size=null", "reward.pretrained=tiny",
                  "evaluation.embedder.pretrained=tiny"]


# logz and tilts span many problems and methods; their paper scale differs from ci only in `iterations`
SCALES_CHECKED = {"logz": ["ci"], "tilts": ["ci"]}


@pytest.mark.slow
@pytest.mark.parametrize("artifact", ["figure1", "table1", "figure2", "table2", "logz", "tilts"])
def test_every_scale_of_every_spec_composes_and_builds_for_every_method(artifact):
    """What `iif-reproduce ARTIFACT --scale S` would launch, for every scale (the paper scale too, which no CI machine
    runs), setting and method, with its per-method sizes and a tuned value: composed by Hydra and built on CPU, so
    a misspelt override key or a size a constructor refuses fails here, not on the GPU an hour in (table2's paper
    scale with tiny models in place of the hub's, which cannot be loaded offline)."""
    from omegaconf import DictConfig, OmegaConf

    from iif.build import build
    from iif.config import compose
    from iif.specs import load_spec, method_overrides, methods_of, run_overrides, settings_of

    spec = load_spec(artifact)
    tuned = {m: f"{t.key}={t['values'][0]}" for m, t in (spec.get("tune") or {}).items()}
    for scale in SCALES_CHECKED.get(artifact, spec.scales):
        for name, setting in settings_of(spec).items():
            for method in methods_of(spec, name):
                own = [*method_overrides(spec, scale, method), *([tuned[method]] if method in tuned else [])]
                cfg, choices = compose([f"method={method}", *run_overrides(spec, scale, setting, own), "logger=none"])
                if OmegaConf.select(cfg, "base_model.pretrained") not in (None, "tiny"):
                    cfg, choices = compose([f"method={method}", *run_overrides(spec, scale, setting, own),
                                            "logger=none", *OFFLINE_MODELS])
                assert choices["method"] == method
                for override in own:  # each per-method size reached the composed config
                    key, value = override.split("=", 1)
                    key = key.lstrip("+")  # ++key=value: add or override
                    if key in choices:  # a group's option (guidance=full)
                        assert choices[key] == value, (scale, override)
                        continue
                    assert not isinstance(OmegaConf.select(cfg, key), DictConfig), (scale, override)
                    got = str(OmegaConf.select(cfg, key)).replace(" ", "")
                    try:
                        assert float(got) == float(value), (scale, override)
                    except ValueError:  # not a number: a list, a word or a boolean (YAML's false is Python's False)
                        assert got.lower() == value.replace(" ", "").lower(), (scale, override)
                build(cfg)


def test_run_settings_runs_every_method_once_jobs_at_a_time_tuned_ones_after_the_tuning(tmp_path, monkeypatch,
                                                                                         capsys):
    """table1's schedule with --jobs 2: both settings prepared before any run; in each setting every method exactly
    once with its own sizes, cg and cg_oracle with the value that setting's tuning chose and only after it; at most
    two multiruns at a time, one torch thread each, a method's seeds in one multirun; the second setting's first
    run starts before the first setting's last one ends (one pool); figure2 (two methods, fewer than two per job)
    as one multirun per run."""
    import threading
    import time as clock

    import iif.reproduce as rp

    spec = rp.load_spec("table1")
    values = [str(v) for v in spec.tune.cg["values"]]
    lock, state, calls, events = threading.Lock(), {"now": 0, "most": 0, "settings": 2}, [], []
    prepared = []

    def fake_sweep(spec, scale, seeds, runs_dir, extra, methods=None, method_overrides=(), subdir=None,
                   threads=None):
        setting = (runs_dir.parent if subdir is not None else runs_dir).name
        with lock:
            assert len(prepared) == state["settings"]  # every setting prepared first
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
            events.append(("start", setting, methods[0], subdir))
        clock.sleep(0.05)
        if subdir is not None:  # the tuning grid: the setting 'even' prefers other values
            for i, v in enumerate(values):
                fid, gap = (abs(i - 2), 5 - i) if setting == "single" else (i, i)
                (runs_dir / f"v{v}").mkdir(parents=True, exist_ok=True)
                (runs_dir / f"v{v}" / "metrics.json").write_text(json.dumps({"fid": fid, "reward_gap": gap}))
        with lock:
            state["now"] -= 1
            events.append(("end", setting, methods[0], subdir))
            calls.append((setting, methods, list(method_overrides), threads, subdir, list(seeds)))

    monkeypatch.setattr(rp, "run_sweep", fake_sweep)
    monkeypatch.setattr(rp, "prepare_base", lambda spec, scale, extra, job_dir: prepared.append(extra))
    where = {name: (tmp_path / name, [f"reward.classes={c}"]) for name, c in (("single", "[3]"), ("even", "[0,2]"))}
    rp.run_settings(spec, "ci", [0, 1], where, jobs=2)
    assert prepared == [["reward.classes=[3]"], ["reward.classes=[0,2]"]]
    for setting, (cg, oracle) in (("single", (values[2], values[-1])), ("even", (values[0], values[0]))):
        runs = [c for c in calls if c[0] == setting and c[4] is None]
        assert sorted(m for c in runs for m in c[1]) == sorted(spec.methods) and all(len(c[1]) == 1 for c in runs)
        own = {c[1][0]: c[2] for c in runs}
        assert own["base"] == [] and own["topk"] == []
        assert own["iif"] == rp.method_overrides(spec, "ci", "iif")
        assert own["cg"] == [f"method.guide.gamma={cg}"] and own["cg_oracle"] == [f"method.guide.gamma={oracle}"]
        tuning_end = events.index(("end", setting, "cg", "v${method.guide.gamma}"))
        assert all(events.index(("start", setting, m, None)) > tuning_end for m in ("cg", "cg_oracle"))
    assert state["most"] == 2 and all(c[3] == 1 for c in calls)
    assert all(c[4] is not None or sorted(c[5]) == [0, 1] for c in calls)  # a method's seeds in one multirun
    first_even = min(i for i, e in enumerate(events) if e[0] == "start" and e[1] == "even")
    last_single = max(i for i, e in enumerate(events) if e[0] == "end" and e[1] == "single")
    assert first_even < last_single
    # a progress line per finished multirun: 11 a setting (the tuning grid and ten methods)
    progress = [line for line in capsys.readouterr().out.splitlines() if line.startswith("iif-reproduce: ")]
    assert [line.split()[1] for line in progress] == [f"{k}/22" for k in range(1, 23)]
    assert sum("(single: tuning grid)" in line for line in progress) == 1
    assert sum("(even: iif seed 0,1)" in line for line in progress) == 1

    calls.clear()
    prepared.clear()
    state["settings"] = 1
    rp.run_settings(rp.load_spec("figure2"), "ci", [0, 1], {"": (tmp_path / "few", [])}, jobs=2)
    assert sorted((c[1][0], c[5]) for c in calls) == [("base", [0]), ("base", [1]), ("iif", [0]), ("iif", [1])]


def test_several_artifacts_share_one_pool_and_each_writes_its_own_outputs(tmp_path, monkeypatch, capsys):
    """``iif-reproduce table1 figure2 --jobs 2``: every setting of both prepared before any run, every method of both
    run once (figure2's seeds one run each), progress lines naming the artifact, and each artifact aggregated into
    its own ``outputs/ARTIFACT``. ``--out``, a study beside a sweep, and a ``--methods`` list that leaves one
    artifact nothing are each one error line."""
    import iif.reproduce as rp

    monkeypatch.chdir(tmp_path)
    prepared, ran, reported = [], [], []
    values = [str(v) for v in rp.load_spec("table1").tune.cg["values"]]

    def fake_sweep(spec, scale, seeds, runs_dir, extra, methods=None, method_overrides=(), subdir=None,
                   threads=None):
        assert len(prepared) == 3  # table1's two settings and figure2's one, before any run
        if subdir is not None:  # the tuning grid
            for v in values:
                (runs_dir / f"v{v}").mkdir(parents=True, exist_ok=True)
                (runs_dir / f"v{v}" / "metrics.json").write_text(json.dumps({"fid": 1.0, "reward_gap": 1.0}))
            return
        ran.append((spec.name, runs_dir.relative_to(tmp_path).as_posix(), methods[0], tuple(seeds)))

    monkeypatch.setattr(rp, "run_sweep", fake_sweep)
    monkeypatch.setattr(rp, "prepare_base", lambda spec, scale, extra, job_dir: prepared.append(spec.name))
    monkeypatch.setattr(rp, "report_artifact", lambda spec, scale, seeds, where, out_dir, t0: reported.append(
        (spec.name, out_dir.as_posix(), sorted(where))))
    assert rp.main(["table1", "figure2", "--jobs", "2"]) == 0
    assert prepared == ["table1", "table1", "figure2"]
    table1, figure2 = rp.load_spec("table1"), rp.load_spec("figure2")
    for setting in ("single", "even"):
        assert sorted(m for name, d, m, _ in ran if d == f"outputs/table1/runs/{setting}") == sorted(table1.methods)
    assert sorted((m, s) for name, d, m, s in ran if name == "figure2") == sorted(
        (m, (seed,)) for m in figure2.methods for seed in figure2.seeds)
    assert reported == [("table1", "outputs/table1", ["even", "single"]), ("figure2", "outputs/figure2", [""])]
    out = capsys.readouterr().out
    assert "(table1/single: iif seed 0,1)" in out and "(figure2: iif seed 0)" in out

    for argv, message in ((["table1", "figure2", "--out", "x"], "--out names one artifact's folder"),
                          (["table1", "variance"], "variance is a study"),
                          (["table1", "figure2", "--methods", "vargrad"], "figure2 has none of the methods vargrad"),
                          (["table1", "figure2", "--methods", "iif,nope"], "unknown method 'nope': none of"),
                          (["table1", "--methods", "nope"], "unknown method 'nope'")):
        with pytest.raises(SystemExit) as e:
            rp.main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err, argv


def test_claims_per_scale_finite_tables_and_comprehensions():
    """A claim with ``scales`` is skipped at other scales; ``finite`` walks nested tables; a comprehension sees the
    settings (names are the expression's globals); a setting that was not run is skipped, not an error."""
    from omegaconf import OmegaConf

    from iif.report import check_claims

    spec = OmegaConf.create({"checks": [
        {"claim": "finite", "expr": "finite(a) and finite(b)"},
        {"claim": "science", "expr": "a['r']['iif'] > 0", "scales": ["paper"]},
        {"claim": "all", "expr": "all_of([s['r']['iif'] > s['r']['base'] for s in (a, b)])"},
        {"claim": "mean", "expr": "mean_of([s['r']['iif'] for s in (a, b)]) == 2.5"},
        {"claim": "missing", "expr": "finite(c)"},
    ]})
    tables = {"a": {"r": {"iif": 2.0, "base": 1.0}}, "b": {"r": {"iif": 3.0, "base": float("nan")}}}
    lines = check_claims(spec, tables, "ci")
    assert lines[0].startswith("FAIL: finite")  # b's base is NaN
    assert lines[1].startswith("SKIP (checked at scale paper): science")
    assert lines[2].startswith("FAIL: all")  # 3 > nan is False
    assert lines[3].startswith("PASS: mean")
    assert lines[4].startswith("SKIP (c not run)")
    tables["b"]["r"]["base"] = 0.5
    lines = check_claims(spec, tables, "paper")
    assert [line.split(":")[0] for line in lines[:4]] == ["PASS"] * 4


def test_common_metrics_are_one_column_the_mean_over_settings(tmp_path):
    """``common_metrics`` (time, memory) become one column: the mean over settings, s.e. ``sqrt(sum se^2) / n``,
    computed here by hand; the other metrics keep a column per setting."""
    from iif.report import write_combined

    def row(method, r, t, t_se):
        return {"method": method, "n": 2, "r": r, "r_se": 0.1, "t": t, "t_se": t_se, "_counts": {"r": 2, "t": 2}}

    settings = [("s1", [row("iif", 1.0, 10.0, 3.0), row("base", 0.0, 1.0, 0.0)]),
                ("s2", [row("iif", 2.0, 20.0, 4.0), row("base", 0.5, 3.0, 0.0)])]
    write_combined(settings, ["r", "t"], tmp_path, common=["t"])
    rows = list(csv.DictReader((tmp_path / "table.csv").open()))
    assert list(rows[0]) == ["method", "n", "s1/r", "s1/r_se", "s2/r", "s2/r_se", "t", "t_se"]
    iif = rows[0]
    assert float(iif["s1/r"]) == 1.0 and float(iif["s2/r"]) == 2.0
    assert float(iif["t"]) == 15.0 and math.isclose(float(iif["t_se"]), math.sqrt(3.0 ** 2 + 4.0 ** 2) / 2)
    assert float(rows[1]["t"]) == 2.0
    # a method run on the second setting only (only_on) takes its place in the spec's order, with one setting's mean
    settings[1][1].append(row("as", 3.0, 7.0, 1.0))
    write_combined(settings, ["r", "t"], tmp_path, common=["t"], order=["base", "as", "iif"])
    rows = list(csv.DictReader((tmp_path / "table.csv").open()))
    assert [r["method"] for r in rows] == ["base", "as", "iif"]
    assert rows[1]["s1/r"] == "" and float(rows[1]["s2/r"]) == 3.0 and float(rows[1]["t"]) == 7.0


def test_a_setting_may_choose_its_own_experiment():
    """logz's settings are problems: their `experiment=` replaces the spec's (Hydra takes one value per key)."""
    from iif.specs import load_spec, run_overrides

    spec = load_spec("logz")
    over = run_overrides(spec, "ci", ["experiment=sample_gmm", "seed=3"])
    assert over[0] == "experiment=sample_gmm" and sum(o.startswith("experiment=") for o in over) == 1
    assert over[-1] == "seed=3"
    assert run_overrides(spec, "ci", [])[0] == f"experiment={spec.experiment}"


def test_ranking_within_settings(tmp_path):
    """Ranks per setting (ties share the better rank), mean rank over settings, and the win rate (mean over the
    other methods of the share of shared settings won, ties half; worked out by hand below), the order."""
    from iif.report import ranking

    def order(text):
        rows = [r for r in text.splitlines() if r.startswith("| ") and "mean rank" not in r]
        return [r.split(" | ")[0][2:] for r in rows]

    tables = {"a": {"d": {"x": 0.1, "y": 0.3, "z": 0.1}}, "b": {"d": {"x": 0.5, "y": 0.2, "z": 0.4}}}
    text = ranking(tables, "d", "lower", ["x", "y", "z"])
    # x: vs y 1/2, vs z (tie, lost) 1/4 -> 0.375; y: vs x 1/2, vs z 1/2 -> 0.5; z: vs x 3/4, vs y 1/2 -> 0.625
    assert order(text) == ["z", "y", "x"]
    assert "| z | 0.62 | 1.50 | 1 | 2 |" in text and "| x | 0.38 | 2.00 | 1 | 3 |" in text
    text = ranking(tables, "d", "higher", ["x", "y", "z"])
    assert order(text) == ["x", "y", "z"]
    assert "| x | 0.62 | 1.50 | 2 | 1 |" in text and "| y | 0.50 | 2.00 | 1 | 3 |" in text  # x, z tie in a: rank 2


def test_ranking_compares_a_method_on_some_settings_only_where_it_ran():
    """w runs on setting a only (``only_on``), second there behind x and ahead of y: its mean rank (2.0) trails y's
    (1.67, from the settings w skipped), but head to head it beat y where both ran: win rates x 2/3, w 1/2, y 1/3."""
    from iif.report import ranking

    tables = {"a": {"d": {"x": 1.0, "w": 2.0, "y": 3.0}}, "b": {"d": {"x": 2.0, "y": 1.0}},
              "c": {"d": {"x": 2.0, "y": 1.0}}}
    text = ranking(tables, "d", "lower", ["x", "y", "w"])
    rows = [r for r in text.splitlines() if r.startswith("| ") and "mean rank" not in r]
    assert rows == ["| x | 0.67 | 1.67 | 1 | 2 | 2 |", "| w | 0.50 | 2.00 | 2 | – | – |",
                    "| y | 0.33 | 1.67 | 3 | 1 | 1 |"]


def test_methods_allowed_to_fail_are_listed_not_fatal(tmp_path, monkeypatch):
    """A run of a `may_fail` method that exits with an error (TSM diverging) is recorded in failed.json and the
    other runs go on; a failure of any other method stops the artifact."""
    import subprocess

    from omegaconf import OmegaConf

    import iif.reproduce as rp

    ran = []

    def fake_sweep(spec, scale, seeds, runs_dir, extra, methods=None, method_overrides=(), threads=None, **kw):
        ran.append((methods[0], tuple(seeds)))
        if methods[0] in ("tsm", "bad") and 1 in seeds:
            raise subprocess.CalledProcessError(1, ["iif-train"])

    monkeypatch.setattr(rp, "run_sweep", fake_sweep)
    monkeypatch.setattr(rp, "prepare_base", lambda *a, **k: None)
    spec = OmegaConf.create({"methods": ["csm", "tsm"], "may_fail": ["tsm"], "scales": {"ci": []}, "overrides": []})
    rp.run_settings(spec, "ci", [0, 1, 2], {"": (tmp_path, [])}, jobs=1)
    assert json.loads((tmp_path / "failed.json").read_text()) == ["tsm seed 1"]
    assert ("csm", (0, 1, 2)) in ran and {("tsm", (s,)) for s in (0, 1, 2)} <= set(ran)  # one run per seed
    spec.methods = ["bad"]
    with pytest.raises(subprocess.CalledProcessError):
        rp.run_settings(spec, "ci", [0, 1], {"": (tmp_path, [])}, jobs=1)


def test_only_on_runs_a_method_on_its_settings_only(tmp_path, monkeypatch):
    """tilts' ``only_on``: adjoint sampling (Gaussian bases only) runs on the three sampling problems and no other;
    every other method on all seven. A spec naming an unknown method or setting is refused in one line."""
    import iif.reproduce as rp
    import iif.specs as specs

    ran = {}

    def fake_submit(pool, spec, scale, seeds, runs_dir, *rest):
        ran[runs_dir.name] = list(spec.methods)
        return []  # nothing runs: the aggregation then stops (it needs real runs)

    monkeypatch.setattr(rp, "_submit_setting", fake_submit)
    monkeypatch.setattr(rp, "prepare_base", lambda *a: None)
    for setting in ("on_modes", "gmm_energy"):
        with pytest.raises(SystemExit):
            rp.main(["tilts", "--settings", setting, "--out", str(tmp_path)])
    spec = specs.load_spec("tilts")
    assert ran["gmm_energy"] == list(spec.methods) and "as" in spec.methods
    assert ran["on_modes"] == [m for m in spec.methods if m != "as"]
    assert {s for s in specs.settings_of(spec) if "as" in specs.methods_of(spec, s)} == {"gmm_energy", "double_well",
                                                                                    "gmm10d"}
    bad = tmp_path / "experiments"
    for only_on, message in (("{as: [hot]}", "names setting 'hot'"), ("{cg: [a]}", "names 'cg', not one of")):
        (bad / "x").mkdir(parents=True, exist_ok=True)
        (bad / "x" / "spec.yaml").write_text(f"methods: [base, as]\nsettings: {{a: []}}\nonly_on: {only_on}\n")
        monkeypatch.setattr(specs, "EXPERIMENTS", bad)
        with pytest.raises(SystemExit, match=message):
            specs.load_spec("x")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is that of a machine without CUDA")
def test_a_bad_config_is_one_error_line_and_exit_status_2(tmp_path, capsys):
    """``iif-reproduce ... -- device=cuda`` without CUDA stops at the preparation with one ``iif-reproduce: error:``
    line naming the device (not a traceback), exit status 2, and no run is started."""
    status = reproduce(["table1", "--scale", "smoke", "--settings", "single", "--out", str(tmp_path), "--",
                        "device=cuda"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status == 2 and len(err) == 1
    assert err[0].startswith("iif-reproduce: error: table1/single/base: device=cuda, but CUDA is not available")
    assert not any(tmp_path.iterdir())  # found before anything was written


def _record_commands(monkeypatch, rp) -> list[list[str]]:
    """Replace the processes ``iif-reproduce`` starts by a record of their command lines; a tuning grid's run
    writes the ``metrics.json`` of each grid value (all equal: the first value is chosen)."""
    calls = []

    def fake_run(cmd, check=False, env=None):
        calls.append(list(cmd))
        args = dict(a.split("=", 1) for a in cmd if "=" in a)
        subdir = args.get("hydra.sweep.subdir", "")
        if subdir.startswith("v${"):  # a tuning grid: hydra.sweep.subdir=v${KEY}, KEY=v1,v2,...
            for value in args[subdir[3:-1]].split(","):
                folder = Path(args["hydra.sweep.dir"]) / f"v{value}"
                folder.mkdir(parents=True, exist_ok=True)
                (folder / "metrics.json").write_text(json.dumps({"fid": 1.0, "reward_gap": 1.0}))

    monkeypatch.setattr(rp.subprocess, "run", fake_run)
    return calls


def test_dry_run_prints_the_commands_a_run_starts_and_writes_nothing(tmp_path, monkeypatch, capsys):
    """``--dry-run`` of table1 at paper scale on Slurm: every run counted (2 settings x 10 methods x 2 seeds, and a
    grid of 5 guidance scales per setting shared by cg and cg_oracle: 50 runs), nothing written; the command lines
    it prints are those that the same call without ``--dry-run`` starts (the processes replaced by a record; the
    tuned value, ``<tuned>`` in the plan, is the grid's first), the preparation job's included."""
    import shlex

    import iif.reproduce as rp

    call = ["table1", "--scale", "paper", "--jobs", "2", "--out", str(tmp_path / "out"), "--", "launcher=slurm",
            "resources=gpu24", "device=cuda"]
    calls = _record_commands(monkeypatch, rp)
    assert reproduce([*call[:1], "--dry-run", *call[1:]]) == 0
    out = capsys.readouterr().out
    assert not calls and not (tmp_path / "out").exists()
    assert "dry run: 50 runs in 22 multiruns, 2 at a time" in out
    planned = [shlex.split(line.strip()[2:]) for line in out.splitlines() if line.strip().startswith("+ ")]
    jobs = [line.split("one job of the launcher: ", 1)[1] for line in out.splitlines() if "one job of" in line]
    planned += [shlex.split(job) for job in jobs]
    assert len(jobs) == 2 and len(planned) == 24

    monkeypatch.setattr(rp, "report_artifact", lambda *a, **k: None)  # no runs to aggregate
    assert reproduce(call) == 0
    started = [[a.replace("method.guide.gamma=0.5", "method.guide.gamma=<tuned>") if "=0.5," not in a else a
                for a in cmd] for cmd in calls]
    assert sorted(map(tuple, started)) == sorted(map(tuple, planned))
    methods = [(dict(a.split("=", 1) for a in cmd if "=" in a)) for cmd in calls if "iif.train" in cmd]
    single = [(m["method"], m["seed"]) for m in methods if "runs/single" in m["hydra.sweep.dir"]]
    assert sorted(single) == sorted([(m, "0,1") for m in METHODS] + [("cg", "100")])


@pytest.mark.parametrize("call, message", [
    (["table1", "--", "method.nonexistent=1"], "table1/single/base: Could not override 'method.nonexistent'. "
                                               "To append to your config use +method.nonexistent=1"),
    (["table1", "--", "sampler=nope"], "table1/single/base: In 'config': Could not find 'sampler/nope' "
                                       "Available options in 'sampler': brownian ddim"),
    (["table1", "--dry-run", "--", "iterations=-1"], "table1/single/base: iterations must be >= 0, got -1"),
    (["figure1", "--", "launcher=slurm", "resources=multi_gpu"], "figure1/base: method 'base' runs in one process, "
                                                                 "and this run has 4"),
    (["table1", "--settings", "even", "--", "reward=gmm"], "table1/even/base: Could not override "
                                                           "'reward.classes'"),
])
def test_a_bad_run_config_is_one_error_naming_the_run_before_anything_starts(tmp_path, monkeypatch, capsys, call,
                                                                             message):
    """Every run's config is composed and checked first: a misspelt key, an unknown option, a refused size, an
    impossible process count is one ``iif-reproduce: error:`` line naming the first run it breaks, exit status 2;
    no process started, no folder written."""
    import iif.reproduce as rp

    calls = _record_commands(monkeypatch, rp)
    cut = call.index("--")
    assert reproduce([*call[:cut], "--out", str(tmp_path / "out"), *call[cut:]]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"iif-reproduce: error: {message}"), err
    assert not calls and not (tmp_path / "out").exists()


@pytest.mark.parametrize("call, message", [
    (["table1", "--", "method=iif"], "'method=iif' after --: the spec sets each run's method; choose them with "
                                     "--methods"),
    (["table1", "--", "seed=3"], "choose them with --seeds"),
    (["table1", "--", "--out", "x"], "'--out' follows --: options of iif-reproduce go before --"),
    (["table1", "--dry-run", "--skip-runs"], "--dry-run plans the runs; it goes with neither --skip-runs"),
    (["variance", "--dry-run"], "variance is a study (a computation, not a sweep of runs): --dry-run has no runs"),
])
def test_a_misplaced_option_is_a_usage_error(tmp_path, capsys, call, message):
    with pytest.raises(SystemExit) as stop:
        reproduce([*call[:1], "--out", str(tmp_path / "out"), *call[1:]])
    assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_finished_compares_the_saved_config_but_for_the_keys_a_resume_may_change(tmp_path):
    """A run directory with ``metrics.json`` and the ``config.yaml`` of the same run is finished, also when it ran with
    other threads or another logger (keys a resume may change); another seed or a changed size is not, nor a run
    without ``metrics.json``."""
    from omegaconf import OmegaConf

    from iif.config import compose
    from iif.reproduce import finished
    from iif.specs import load_spec, method_overrides, run_overrides

    spec = load_spec("figure1")
    own = method_overrides(spec, "ci", "iif")
    cfg, _ = compose(["method=iif", "seed=0", *run_overrides(spec, "ci", ["logger=none"], own), "torch_threads=1"])
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))  # as iif-train writes it
    assert not finished(tmp_path, spec, "ci", [], "iif", 0, own)  # not finished yet
    (tmp_path / "metrics.json").write_text("{}")
    assert finished(tmp_path, spec, "ci", [], "iif", 0, own)  # the spec's logger, all threads
    assert not finished(tmp_path, spec, "ci", [], "iif", 1, own)
    assert not finished(tmp_path, spec, "ci", ["iterations=3"], "iif", 0, own)


@pytest.mark.slow
def test_a_second_call_completes_a_reproduction_and_leaves_finished_runs_alone(tmp_path, capfd, cli_env,
                                                                               monkeypatch):
    """figure1 at debug sizes, then the same call after one run's directory was lost (a reproduction stopped part
    way): only that run is made again (as ``--dry-run`` says), the finished one is not even evaluated again (its
    files untouched); with ``--reevaluate`` it is, to the same numbers; with a changed size the finished run
    refuses to resume, naming the key."""
    for key, value in cli_env.items():
        monkeypatch.setenv(key, value)
    call = ["figure1", "--methods", "base,iif", "--seeds", "0", "--out", str(tmp_path), "--", "debug=fast",
            "logger=none"]
    assert reproduce(call) == 0
    base, lost = tmp_path / "runs" / "base_seed0", tmp_path / "runs" / "iif_seed0"
    kept = {f: (base / f).stat().st_mtime_ns for f in ("metrics.json", "metrics.jsonl", "checkpoint.pt")}
    numbers = json.loads((base / "metrics.json").read_text())
    import shutil

    shutil.rmtree(lost)
    capfd.readouterr()
    assert reproduce([call[0], "--dry-run", *call[1:]]) == 0  # the plan says so too
    plan = capfd.readouterr().out
    assert "dry run: 1 runs in 1 multiruns, 1 at a time (1 more finished with this config: not run again)" in plan
    assert "base  seeds 0: 20 sampling steps; no training (1 finished: not run again)" in plan
    assert reproduce(call) == 0
    out = capfd.readouterr().out
    assert "base seed 0 in" in out and "finished with this config: not run again" in out
    assert (lost / "metrics.json").exists()
    assert {f: (base / f).stat().st_mtime_ns for f in kept} == kept

    assert reproduce([call[0], "--reevaluate", *call[1:]]) == 0
    assert (base / "metrics.json").stat().st_mtime_ns != kept["metrics.json"]
    again = json.loads((base / "metrics.json").read_text())
    assert {k: again[k] for k in ("mode_tv", "reward_mean")} == {k: numbers[k] for k in ("mode_tv", "reward_mean")}

    capfd.readouterr()
    assert reproduce([*call, "iterations=3"]) == 1
    assert "holds a checkpoint of a run with other settings (iterations: 20 -> 3)" in capfd.readouterr().err
