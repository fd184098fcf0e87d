"""``scripts/control_by_step.py``: a run's path KL split over the sampler's steps. The per-step terms are recomputed
from the kept states (the guidance evaluated again), so their sum checks the sampler's own on-the-fly control cost."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from iif.build import build
from iif.config import compose

ROOT = Path(__file__).resolve().parent.parent
SPEC = importlib.util.spec_from_file_location("control_by_step", ROOT / "scripts" / "control_by_step.py")
control_by_step = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(control_by_step)

SIZES = ["experiment=toy2d", "method=iif", "logger=none", "base_model=gmm_exact", "sampler.n_steps=12",
         "method.n_samples=128", "method.batch_size=64", "method.grad_steps=5", "buffer.prefill=64"]


def trained_method(*overrides: str):
    cfg, _ = compose([*SIZES, "method.ema_decay=0", *overrides])  # sample with the trained weights themselves
    torch.manual_seed(0)
    method = build(cfg).method
    method.setup()
    method.fit_step(0)
    return method


@pytest.mark.parametrize("last_step, guided_steps", [("noise", 12), ("noiseless", 11)])
def test_the_per_step_costs_sum_to_the_samplers_control_cost(last_step, guided_steps):
    method = trained_method(f"sampler.last_step={last_step}")
    torch.manual_seed(1)
    result = control_by_step.control_by_step(method, 64)
    assert len(result["steps"]) == guided_steps  # a noiseless last step is unguided: no control, no term
    assert result["total"] > 1e-4  # one iteration moved h away from zero
    assert result["total"] == pytest.approx(result["sampler_control_cost"], rel=1e-6)
    assert sum(s["share"] for s in result["steps"]) == pytest.approx(1.0)
    assert all(s["cost"] >= 0 and s["h_norm"] >= 0 for s in result["steps"])


def test_an_untrained_zero_guidance_costs_nothing():
    cfg, _ = compose(SIZES)
    method = build(cfg).method  # h == 0 at initialisation
    result = control_by_step.control_by_step(method, 32)
    assert result["total"] == 0.0 and result["sampler_control_cost"] == 0.0
    assert all(s["h_norm"] == 0.0 for s in result["steps"])


def test_a_directory_that_is_not_a_run_is_one_error(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "control_by_step.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    assert "overrides.yaml does not exist: give the directory of a finished iif-train run" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_run_of_a_method_without_guidance_is_one_error(tmp_path):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text("- experiment=toy2d\n- method=base\n")
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "control_by_step.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    assert "method base trains no guidance h" in proc.stderr
    assert "Traceback" not in proc.stderr
