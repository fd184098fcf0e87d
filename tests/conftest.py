"""Shared fixtures: every test runs offline, on CPU, with its own cache of pretrained base models."""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _cache_dir(tmp_path_factory) -> Path:
    """The pretrained-base cache of this test session, shared by pytest-xdist's workers (each worker's base temp is a
    ``popen-gwN`` folder of the session's): the cache's writes are atomic, so a base pretrained by one worker is
    loaded by the others."""
    base = tmp_path_factory.getbasetemp()
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "cache"


def pytest_configure(config):
    """Under pytest-xdist (``make test`` runs one worker per core), one intra-op torch thread per worker, and one per
    process a test starts (CLI runs, scripts, reproduce's jobs inherit ``OMP_NUM_THREADS``): the workers already fill
    the cores. Beside one busy core, `scripts/pathwise_diagnostics.py warm` (a test's subprocess) took 9.6 s at torch's
    default of a thread per core and 6.8 s with one."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(autouse=True)
def _offline_env(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("IIF_CACHE", str(_cache_dir(tmp_path_factory)))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


@pytest.fixture
def cli_env(tmp_path_factory):
    """Environment for `python -m iif.train` subprocesses."""
    env = dict(os.environ)
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", CI="1",
               IIF_CACHE=str(_cache_dir(tmp_path_factory)))
    return env


@pytest.fixture
def one_thread():
    """One intra-op torch thread, restored afterwards: elementwise work on many draws only synchronises threads (and
    stalls on a busy CPU). A test module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def float64_default():
    """Run with float64 as torch's default dtype (the sampler's states follow it), restoring it afterwards."""
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def kill_fit_step_at(monkeypatch, method_cls, iteration: int):
    """Make ``method_cls.fit_step`` raise ``KeyboardInterrupt`` (a simulated kill) when it reaches ``iteration``;
    returns the original, to put back with ``monkeypatch.setattr(method_cls, "fit_step", original)``."""
    original = method_cls.fit_step

    def crash(self, it):
        if it == iteration:
            raise KeyboardInterrupt("simulated kill")
        return original(self, it)

    monkeypatch.setattr(method_cls, "fit_step", crash)
    return original


def gaussian_ddpm_chain(n: int, mu, s2: float, beta_min: float = 0.1, beta_max: float = 20.0) -> dict:
    """The DDPM chain of the exact base for Gaussian data ``N(mu, s2 I)`` on the VP-SDE grid ``k/N``, written out
    here as an independent reference (index ``k = 1..N``; index 0 unused): ``alphabar``, ``alpha``, ``beta``, and the
    affine base mean ``mu^0_k(x) = slope_k x + offset_k`` (the exact score of ``N(sqrt(abar) mu, v)``,
    ``v = abar s2 + 1 - abar``)."""
    mu = torch.as_tensor(mu, dtype=torch.float64)
    m = lambda t: math.exp(-0.25 * t ** 2 * (beta_max - beta_min) - 0.5 * t * beta_min)  # noqa: E731
    abar = [m(k / n) ** 2 for k in range(n + 1)]
    alpha = [1.0] + [abar[k] / abar[k - 1] for k in range(1, n + 1)]
    beta = [1 - a for a in alpha]
    v = [abar[k] * s2 + 1 - abar[k] for k in range(n + 1)]
    slope = [1.0] + [(1 - beta[k] / v[k]) / math.sqrt(alpha[k]) for k in range(1, n + 1)]
    offset = [None] + [beta[k] * math.sqrt(abar[k]) / (v[k] * math.sqrt(alpha[k])) * mu for k in range(1, n + 1)]
    return {"abar": abar, "alpha": alpha, "beta": beta, "slope": slope, "offset": offset}


def write_idx(path: Path, array) -> None:
    """An IDX file (MNIST's format): magic (0, 0, dtype 0x08 = ubyte, ndim), big-endian int32 dims, then the bytes."""
    import struct

    import numpy as np

    arr = np.asarray(array, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes())


@pytest.fixture
def fake_mnist(tmp_path_factory, monkeypatch):
    """A small MNIST-shaped copy in torchvision's layout (``IIF_DATA`` points at it): digits drawn as a bar whose
    position encodes the label, 200 train and 100 test images; nothing is fetched."""
    root = tmp_path_factory.mktemp("data")
    gen = torch.Generator().manual_seed(0)
    for split, n in (("train", 200), ("t10k", 100)):
        labels = torch.arange(n) % 10
        images = (torch.rand(n, 28, 28, generator=gen) * 60).to(torch.uint8)
        for i, c in enumerate(labels.tolist()):
            images[i, 4 + 2 * c: 6 + 2 * c, 4:24] = 255
        write_idx(root / "MNIST" / "raw" / f"{split}-images-idx3-ubyte", images.numpy())
        write_idx(root / "MNIST" / "raw" / f"{split}-labels-idx1-ubyte", labels.numpy())
    monkeypatch.setenv("IIF_DATA", str(root))
    return root
