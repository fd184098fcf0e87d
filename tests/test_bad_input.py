"""Bad input, part two (the first part, in test_train.py: unknown option, misspelt key, impossible pairing,
acceptance outside (0, 1], NaN reward, foreign or truncated checkpoint; SLURM without partition in test_slurm.py).
Each gives one error that names its cause, before compute is spent, and leaves no run directory behind."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from iif.build import build
from iif.config import compose
from iif.train import train
from iif.utils import ConfigError, RunError

FAST = ["debug=fast", "logger=none", "base_model=gmm_exact"]

# (override, what the one-line message must say): the key and the bound it breaks
BAD_SIZES = [
    ("method.n_samples=0", "method.n_samples must be >= 1, got 0"),
    ("method.batch_size=-1", "method.batch_size must be >= 1, got -1"),
    ("method.grad_steps=0", "method.grad_steps must be >= 1, got 0"),
    ("sampler.n_steps=0", "sampler.n_steps must be >= 1, got 0"),
    ("buffer.capacity=0", "buffer.capacity must be >= 1, got 0"),
    ("buffer.prefill=-1", "buffer.prefill must lie in [0, capacity=1024], got -1"),
    ("buffer.capacity=10", "buffer.prefill must lie in [0, capacity=10], got 256"),  # debug=fast prefills 256
    ("evaluation.n_samples=1", "evaluation needs at least 2 samples"),
    ("iterations=-1", "iterations must be >= 0, got -1"),
    ("checkpoint_every=0", "checkpoint_every must be >= 1, got 0"),
]


def run_cli(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "iif.train", *args], env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("override,message", BAD_SIZES, ids=[o for o, _ in BAD_SIZES])
def test_bad_size_is_a_config_error_naming_the_key(tmp_path, monkeypatch, override, message):
    """Zero or negative sizes: a ConfigError (not Hydra's InstantiationException) whose message is one line that
    names the key; raised before the base model is prepared or anything sampled; no run directory left."""
    from iif.base_models.gmm_exact import GMMExact

    def no_compute(self):
        raise AssertionError("compute started before the bad input was reported")

    monkeypatch.setattr(GMMExact, "prepare", no_compute)
    cfg, choices = compose([*FAST, override])
    with pytest.raises(ConfigError) as info:
        train(cfg, tmp_path / "r", choices)
    assert str(info.value) == message
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
@pytest.mark.parametrize("override,message", [BAD_SIZES[0], BAD_SIZES[4]], ids=["n_samples", "capacity"])
def test_bad_size_on_the_command_line(tmp_path, cli_env, override, message):
    """Through the CLI: exit status 2, stderr is exactly one line `iif-train: error: <message>`, no run directory."""
    run_dir = tmp_path / "r"
    proc = run_cli([*FAST, override, f"hydra.run.dir={run_dir}"], cli_env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"iif-train: error: {message}"]
    assert not run_dir.exists()


@pytest.mark.slow
def test_empty_buffer_is_one_clear_line(tmp_path, cli_env):
    """buffer.prefill=0 with an acceptance rate so low that, with N=256 samples, P(nothing accepted) ~ 1 - 256e-12:
    allowed at start-up (no acceptance rate guarantees a sample), but when the first minibatch finds the buffer
    empty the run stops with one line naming the two keys to change, exit status 1. The run directory keeps its
    iteration-0 checkpoint (the run can resume once the options are fixed)."""
    run_dir = tmp_path / "r"
    proc = run_cli([*FAST, "buffer.prefill=0", "method.acceptance.values=[1e-12]", f"hydra.run.dir={run_dir}"],
                   cli_env)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("iif-train: error: the replay buffer is empty")
    assert "buffer.prefill > 0" in lines[0] and "acceptance rate" in lines[0]
    assert not (run_dir / "metrics.json").exists()  # not mistaken for a finished run


def test_empty_buffer_in_process(tmp_path):
    cfg, choices = compose([*FAST, "buffer.prefill=0", "method.acceptance.values=[1e-12]"])
    with pytest.raises(RunError, match=r"replay buffer is empty.*buffer.prefill > 0"):
        train(cfg, tmp_path / "r", choices)
    assert isinstance(RunError("x"), RuntimeError)  # callers catching RuntimeError still do


def test_prefill_zero_with_a_normal_acceptance_runs(tmp_path):
    """The check above is not a start-up refusal of prefill=0: with rho=0.3 the first iteration fills the buffer."""
    cfg, choices = compose([*FAST, "buffer.prefill=0"])
    final = train(cfg, tmp_path / "r", choices)
    assert 0 <= final["mode_tv"] <= 1


def test_unwritable_cache_is_refused_before_pretraining(tmp_path, monkeypatch):
    """toy2d with no cached weights and a cache_dir that cannot be written (a path below a regular file: refused
    even for root): one ConfigError naming base_model, the path and the fix, before pretraining; no run directory."""
    from iif.base_models.toy2d import Toy2DScoreMLP

    def no_pretraining(self):
        raise AssertionError("pretraining started")

    monkeypatch.setattr(Toy2DScoreMLP, "pretrain", no_pretraining)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cfg, choices = compose(["debug=fast", "logger=none", "base_model=toy2d", f"cache_dir={blocker / 'cache'}"])
    with pytest.raises(ConfigError, match=r"base_model 'toy2d' has no cached weights at .*a-file/cache/toy2d-.*"
                                          r"cannot write them there .*set cache_dir \(or IIF_CACHE\)"):
        train(cfg, tmp_path / "r", choices)
    assert not (tmp_path / "r").exists()


def test_read_only_cache_with_the_weights_is_fine(tmp_path, monkeypatch):
    """The check does not refuse a cache that already holds the weights (a prefetched cache on an offline node):
    the weights are loaded, nothing pretrained."""
    from iif.base_models.toy2d import Toy2DScoreMLP
    from iif.build import build
    from iif.checks import check_cache_writable

    cfg, choices = compose(["debug=fast", "logger=none", "base_model=toy2d", f"cache_dir={tmp_path / 'cache'}"])
    base = build(cfg).base
    path = base.cache_path()
    path.parent.mkdir(parents=True)
    import torch
    torch.save(base.net.state_dict(), path)
    monkeypatch.setattr(Toy2DScoreMLP, "pretrain", lambda self: (_ for _ in ()).throw(AssertionError("pretrained")))
    monkeypatch.setattr("tempfile.TemporaryFile", lambda **_: (_ for _ in ()).throw(PermissionError(13, "denied")))
    check_cache_writable(base, choices)  # does not probe: the weights are there
    base.prepare()
    assert all(torch.equal(a, b) for a, b in zip(base.net.state_dict().values(), torch.load(path).values()))


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is that of a machine without CUDA")
def test_prepare_on_a_device_this_machine_lacks_is_one_line(tmp_path, cli_env):
    """``iif-prepare ... device=cuda`` without CUDA: exit status 2, one ``iif-prepare: error:`` line naming the
    device, nothing pretrained and no output directory left."""
    out = tmp_path / "p"
    proc = subprocess.run([sys.executable, "-m", "iif.prepare", "experiment=mnist_class", "device=cuda",
                           f"hydra.run.dir={out}"], env={**cli_env, "IIF_CACHE": str(tmp_path / "cache")},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("iif-prepare: error: device=cuda, but CUDA is not available")
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_a_key_the_option_does_not_take_is_one_line_naming_it():
    """``experiment=tiny_t2i`` sets ``sampler.steps_offset`` (SD's DDIM); with ``sampler=ddpm`` that key reaches a
    constructor without it: one ConfigError naming the key and how to drop it, not Hydra's TypeError traceback."""
    cfg, _ = compose(["experiment=tiny_t2i", "sampler=ddpm", "logger=none"])
    with pytest.raises(ConfigError) as info:
        build(cfg)
    assert str(info.value) == ("sampler.steps_offset: DDPMSampler takes no such argument (the key was set for another "
                               "option, e.g. by the experiment); remove it with ~sampler.steps_offset")
    cfg, _ = compose(["experiment=tiny_t2i", "sampler=ddpm", "logger=none", "~sampler.steps_offset"])
    assert type(build(cfg).method).__name__ == "IIF"  # the remedy works
