"""``device=cpu|cuda|cuda:N`` (``iif.device``) without a GPU: the errors, and the placement of every tensor.

There is no GPU here, so the placement is checked the other way round: with torch's default device set to ``meta``
(tensors without data), a tensor that our code creates without naming its device lands on ``meta``; the first
operation that mixes it with the run's (CPU) tensors raises, and reading it raises or returns garbage that the
reward's non-finite check or the final ``isfinite`` catches. One iteration (with the setup, e.g. IIF's buffer
prefill) and an evaluation of every method run clean under that setting: every tensor follows the device of the
data it meets, or is deliberately on the CPU (the buffer, the time draws, the schedule's coefficients, the exact
target). Without this, a GPU run would fail at the first such tensor (a CPU tensor meeting a CUDA one).
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from iif import device as devices
from iif.build import build
from iif.config import compose
from iif.train import evaluate
from iif.utils import ConfigError


METHODS = ["iif", "reward_only", "base", "cg", "cg_tweedie", "topk", "pathwise", "vargrad", "dpok", "am"]


@pytest.mark.parametrize("overrides", [
    *([f"method={m}", "base_model=gmm_exact"] for m in METHODS),
    ["method=iif", "base_model=toy2d", "guidance=mlp"],
    ["method=dpok", "base_model=toy2d", "guidance=mlp", "reward=gmm_blackbox"],
], ids=[*METHODS, "iif-toy2d-mlp", "dpok-toy2d-blackbox"])
def test_every_tensor_is_created_on_the_device_of_its_data(overrides):
    cfg, _ = compose(["experiment=toy2d", "debug=fast", "logger=none", *overrides])
    comp = build(cfg)
    comp.base.prepare()  # toy2d: the pretrained network (an untrained one can diverge to NaN)
    comp.method.setup()
    comp.method.fit_step(0)  # the optimiser's state is created lazily: at the first step, outside the check
    torch.set_default_device("meta")
    try:
        comp.method.setup()
        row = comp.method.fit_step(1)
        result = evaluate(comp, seed=0)
        metrics, samples = result.metrics, result.samples
    finally:
        torch.set_default_device("cpu")
    assert samples.device.type == "cpu" and torch.isfinite(samples).all()
    assert 0 <= metrics["mode_tv"] <= 1 and isinstance(row, dict)


def test_the_check_catches_a_tensor_created_without_a_device(monkeypatch):
    """The check itself: a sampler that draws its noise without naming the device fails it."""
    from iif.samplers.ddpm import DDPMSampler

    monkeypatch.setattr(DDPMSampler, "_noise", staticmethod(lambda n, x, rows: torch.randn(n, *x.shape[1:])[rows]))
    cfg, _ = compose(["experiment=toy2d", "debug=fast", "logger=none", "method=iif", "base_model=gmm_exact"])
    comp = build(cfg)
    torch.set_default_device("meta")
    try:
        with pytest.raises((RuntimeError, NotImplementedError)):
            comp.method.fit_step(0)
    finally:
        torch.set_default_device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
@pytest.mark.parametrize("spec,message", [
    ("cuda", "device=cuda, but CUDA is not available here"),
    ("cuda:1", "device=cuda:1, but CUDA is not available here"),
    ("tpu", "device=tpu: expected cpu, cuda (this process's GPU) or cuda:N"),
])
def test_unusable_device_is_one_clear_error(spec, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        devices.resolve(spec)
    assert devices.resolve("cpu") == torch.device("cpu")


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_cli_device_cuda_without_a_gpu_stops_before_anything_is_written(tmp_path, cli_env):
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "iif.train", "experiment=toy2d", "base_model=gmm_exact", "device=cuda",
                           "logger=none", f"hydra.run.dir={run}"], env=cli_env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("iif-train: error: device=cuda, but CUDA is not available")
    assert not run.exists()


def test_rng_state_round_trip_and_a_checkpoint_from_before_devices():
    state = devices.rng_state(torch.device("cpu"))
    a = torch.rand(3)
    devices.set_rng_state(state, torch.device("cpu"))
    torch.testing.assert_close(torch.rand(3), a, rtol=0, atol=0)
    devices.set_rng_state(state["cpu"], torch.device("cpu"))  # the old format: the CPU state alone
    torch.testing.assert_close(torch.rand(3), a, rtol=0, atol=0)
