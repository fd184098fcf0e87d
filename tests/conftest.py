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
