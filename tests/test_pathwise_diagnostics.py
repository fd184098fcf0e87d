"""``scripts/pathwise_diagnostics.py``: the per-step gradient statistics of the two pathwise estimators, and pathwise
started from another run's guidance."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from iif.config import compose
from iif.train import train

pytestmark = pytest.mark.slow  # multi-process, Slurm, CLI or pretraining: minutes; `make test` runs it

ROOT = Path(__file__).resolve().parent.parent
SIZES = ["base_model=gmm_exact", "sampler.n_steps=20", "evaluation.n_samples=1000", "evaluation.n_energy=256"]


@pytest.fixture(scope="module")
def iif_run(tmp_path_factory) -> Path:
    """A short IIF run (EMA weights in its checkpoint) whose guidance the script loads."""
    run = tmp_path_factory.mktemp("diag") / "iif"
    cfg, choices = compose(["experiment=toy2d", "method=iif", "logger=none", "iterations=2", "method.n_samples=256",
                            "method.batch_size=128", "method.grad_steps=20", "buffer.prefill=256", *SIZES])
    train(cfg, run, choices)
    return run


def script(tmp_path, *args) -> dict:
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "pathwise_diagnostics.py"), *args,
                           "--out", str(out), *SIZES], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text())


def test_grad_estimators_agree_at_zero_control_and_differ_at_a_trained_one(tmp_path, iif_run):
    """At ``h = 0`` the two estimators are the same per path (their difference ``<z, grad_x Delta dx/dtheta>`` and the
    score term vanish), so the noise ratio is 1; at a trained, state-dependent ``h`` it is not. Heavy-tail shares are
    fractions of at least 1 % (the top 1 % of paths carry at least their share)."""
    fresh = script(tmp_path, "grad", "--batch", "256")
    assert fresh["summary"]["median_noise_ratio_stl_over_analytic"] == pytest.approx(1.0, abs=1e-5)
    trained = script(tmp_path, "grad", "--batch", "256", "--run", str(iif_run))
    assert abs(trained["summary"]["median_noise_ratio_stl_over_analytic"] - 1.0) > 1e-3
    for rows in trained["per_step"].values():
        assert len(rows) == 20 and all(0.01 <= r["top1_share"] <= 1 + 1e-9 for r in rows)


def test_warm_starts_from_the_runs_guidance(tmp_path, iif_run):
    """Iteration 0 evaluates the loaded (EMA) guidance with the run's evaluation seed: the IIF run's own final
    mode_tv, for both estimators; one pathwise iteration then moves it."""
    res = script(tmp_path, "warm", "--run", str(iif_run), "--iterations", "1", "--every", "1", "--batch", "32",
                 "method.grad_steps=2")
    final = json.loads((iif_run / "metrics.json").read_text())
    for curve in res["curves"].values():
        assert [c["iteration"] for c in curve] == [0, 1]
        assert curve[0]["mode_tv"] == pytest.approx(final["mode_tv"], abs=1e-12)
        assert curve[1]["sc_loss"] != curve[0]["sc_loss"]


def test_warm_needs_a_run(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "pathwise_diagnostics.py"), "warm"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode != 0 and "--run DIR is required" in proc.stderr
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "pathwise_diagnostics.py"), "grad", "--run",
                           str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode != 0 and "checkpoint.pt does not exist" in proc.stderr


def test_a_guidance_that_does_not_fit_is_one_error(tmp_path, iif_run):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "pathwise_diagnostics.py"), "grad", "--run",
                           str(iif_run), *SIZES, "guidance=mlp"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode != 0 and "does not fit this config's" in proc.stderr and "Traceback" not in proc.stderr
