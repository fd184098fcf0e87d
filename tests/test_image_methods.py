"""Every method on images: a tiny UNet base (1x8x8, random weights, class-conditional) with a classifier reward and
the convolutional reward-informed guidance (``experiment=tiny_image``), under ``sampler=ddpm`` and ``sampler=ddim``
with ``eta > 0``: two iterations end to end, and a run killed after its first iteration resumes from its checkpoint
to the uninterrupted run's numbers."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from hydra.utils import get_class

from iif.config import compose
from iif.train import train
from tests.conftest import kill_fit_step_at

pytestmark = pytest.mark.slow

METHODS = ["iif", "reward_only", "base", "cg", "cg_tweedie", "pathwise", "vargrad", "dpok", "am", "topk"]
SAMPLERS = {"ddpm": ["sampler=ddpm"], "ddim": ["sampler=ddim", "sampler.eta=0.5"]}
SIZES = {  # tiny sizes per method, on top of debug=fast
    "iif": ["method.n_samples=16", "method.batch_size=8", "method.grad_steps=2", "buffer.prefill=8"],
    "reward_only": ["method.n_samples=16", "method.batch_size=8", "method.grad_steps=2", "buffer.prefill=8"],
    "pathwise": ["method.batch_size=4", "method.grad_steps=1"],
    "vargrad": ["method.batch_size=4", "method.grad_steps=1"],
    "am": ["method.batch_size=4", "method.grad_steps=1", "method.loss_steps=2"],
    "dpok": ["method.n_samples=4", "method.transitions=64", "method.batch_size=8", "method.grad_steps=2",
             "method.value_steps=1", "method.value_batch_size=8"],
    "topk": ["method.k=2"],
}


def _overrides(method: str, sampler: str) -> list[str]:
    return ["experiment=tiny_image", f"method={method}", *SAMPLERS[sampler], "debug=fast", "logger=none",
            "sampler.n_steps=4", "iterations=2", "checkpoint_every=1", "torch_threads=1", *SIZES.get(method, [])]


def _numbers(final: dict) -> dict:
    return {k: v for k, v in final.items() if k in ("reward_mean", "sc_loss", "kl_path", "sample_nfe", "base_nfe",
                                                     "reward_evals", "reward_grad_evals")}


@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("method", METHODS)
def test_method_runs_on_images_and_resumes(method, sampler, tmp_path, monkeypatch):
    cfg, choices = compose(_overrides(method, sampler))
    reference = train(cfg, tmp_path / "straight", choices)
    assert torch.isfinite(torch.tensor(reference["reward_mean"]))
    samples = torch.load(tmp_path / "straight" / "samples.pt", weights_only=True)
    assert samples.shape[1:] == (1, 8, 8)
    assert (tmp_path / "straight" / "samples.png").exists()
    rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]

    method_cls = get_class(cfg.method._target_)
    original = kill_fit_step_at(monkeypatch, method_cls, 1)
    with pytest.raises(KeyboardInterrupt):
        train(compose(_overrides(method, sampler))[0], tmp_path / "killed", choices)
    assert torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)["iteration"] == 1
    monkeypatch.setattr(method_cls, "fit_step", original)
    resumed = train(compose(_overrides(method, sampler))[0], tmp_path / "killed", choices)
    assert _numbers(resumed) == _numbers(reference)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_image_run_from_the_command_line(sampler, tmp_path, cli_env):
    """``iif-train experiment=tiny_image`` as a user runs it: a process, a run directory, exit 0."""
    run_dir = tmp_path / "r"
    proc = subprocess.run([sys.executable, "-m", "iif.train", *_overrides("iif", sampler), f"hydra.run.dir={run_dir}"],
                          capture_output=True, text=True, env=cli_env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    final = json.loads((run_dir / "metrics.json").read_text())
    assert final["method"] == "iif" and final["iterations"] == 2


def test_iif_amortised_over_simulated_measurements(tmp_path):
    """``conditions=measurements``: each trajectory is conditioned on a measurement ``y = A x0 + sigma_y eps`` of a
    base sample; the buffer stores ``(x0, y)`` and the loss gives ``y`` to the amortised ``h``; resumable like any
    run (the buffer's conditions are in the checkpoint)."""
    overrides = ["experiment=tiny_image", "conditions=measurements", "~conditions.classes", "guidance.cond_channels=1",
                 "guidance.num_classes=null", "base_model.num_classes=null", "reward.classes=[3]", "method=iif",
                 "debug=fast", "logger=none", "sampler.n_steps=4", "iterations=2", "checkpoint_every=1",
                 *SIZES["iif"]]
    cfg, choices = compose(overrides)
    final = train(cfg, tmp_path / "r", choices)
    state = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)["state"]["buffer"]
    assert state["cond"].shape[1:] == (1, 4, 4) and state["cond"].shape[0] == state["data"].shape[0]
    assert final["iterations"] == 2
