"""No secret reaches a run directory, a log or the console: a run with a W&B API key (and another secret) in its
environment writes neither anywhere. Everything under the run (or sweep) directory is searched byte for byte:
``.hydra/``, ``config.yaml``, ``train.log``, ``metrics.json(l)``, the checkpoint, ``wandb/`` (the offline ``.wandb``
run file, ``debug*.log``, ``output.log``, media) and, for the submitit launcher, ``.submitit/`` (scripts, pickles,
job logs)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # multi-process, Slurm, CLI or pretraining: minutes; `make test` runs it

FAKE_WANDB_KEY = "fake-key-0123456789abcdef0123456789abcdef01234567"
FAKE_OTHER = "hf_FAKESECRETzyxwvut9876543210"  # e.g. a Hugging Face token in the environment
SECRETS = (FAKE_WANDB_KEY, FAKE_OTHER)
RUN = ["experiment=toy2d", "method=iif", "logger=wandb", "logger.mode=offline", "debug=fast", "base_model=gmm_exact"]


def files_containing(root: Path, secret: str) -> list[str]:
    """Every file under ``root`` whose bytes contain ``secret`` (plain, or as UTF-16 as some pickles store it)."""
    needles = (secret.encode(), secret.encode("utf-16-le"))
    return [str(p) for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink() and any(n in p.read_bytes() for n in needles)]


@pytest.fixture
def secret_env(cli_env):
    return {**cli_env, "WANDB_API_KEY": FAKE_WANDB_KEY, "HF_TOKEN": FAKE_OTHER, "IIF_TEST_SECRET": FAKE_OTHER}


def run_cli(args: list[str], env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "iif.train", *args], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"iif-train failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def assert_no_secret(root: Path, proc: subprocess.CompletedProcess) -> None:
    for secret in SECRETS:
        assert files_containing(root, secret) == [], f"secret written under {root}"
        assert secret not in proc.stdout and secret not in proc.stderr, "secret printed"


def test_no_secret_in_a_single_run(tmp_path, secret_env):
    run_dir = tmp_path / "run"
    proc = run_cli([*RUN, f"hydra.run.dir={run_dir}"], secret_env)
    # the search really covered the W&B offline files and the saved configs (not an empty or partial tree)
    wandb_files = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(wandb_files) == 1 and wandb_files[0].stat().st_size > 1000
    for name in (".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "config.yaml", "train.log",
                 "metrics.jsonl", "metrics.json", "checkpoint.pt", "wandb/debug.log"):
        assert (run_dir / name).is_file(), name
    # sanity of the search itself: a value known to be in the environment and in the config is found
    assert files_containing(run_dir, secret_env["IIF_CACHE"]), "the search finds an env value that is saved"
    assert_no_secret(run_dir, proc)


def test_no_secret_in_a_submitit_sweep(tmp_path, secret_env):
    """``-m launcher=slurm_local``: submitit writes a job script, pickles of the job and its logs; none holds a
    secret from the submitting environment (jobs inherit the environment, they do not store it)."""
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", *RUN, "launcher=slurm_local", "seed=0", f"hydra.sweep.dir={sweep}"], secret_env)
    assert len(list(sweep.glob("*/metrics.json"))) == 1
    assert list(sweep.glob(".submitit/*/*.pkl")), "submitit files were written and searched"
    assert_no_secret(sweep, proc)
