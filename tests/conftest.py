"""Shared fixtures: every test runs offline, on CPU, with its own cache of pretrained base models."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _offline_env(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("IIF_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


@pytest.fixture
def cli_env(tmp_path_factory):
    """Environment for `python -m iif.train` subprocesses."""
    env = dict(os.environ)
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", CI="1",
               IIF_CACHE=str(tmp_path_factory.getbasetemp() / "cache"))
    return env


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
