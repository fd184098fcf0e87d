"""``scripts/wandb_sync.py``: lists the offline W&B runs that real toy runs wrote (ids as in their checkpoints and
``wandb/`` folders), reads wandb's ``.synced`` marker, refuses clearly when not logged in or offline, and calls
``wandb sync`` once per unsynced run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "wandb_sync.py"
sys.path.insert(0, str(SCRIPT.parent))
import wandb_sync  # noqa: E402

pytestmark = pytest.mark.slow  # multi-process, Slurm, CLI or pretraining: minutes; `make test` runs it


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A two-seed sweep with logger=wandb (offline), run through the CLI."""
    sweep = tmp_path_factory.mktemp("sync") / "sweep"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "CI": "1",
           "IIF_CACHE": str(tmp_path_factory.getbasetemp() / "cache")}
    env.pop("WANDB_API_KEY", None)
    proc = subprocess.run([sys.executable, "-m", "iif.train", "-m", "experiment=toy2d", "method=iif", "seed=0,1",
                           "debug=fast", "base_model=gmm_exact", "logger=wandb", f"hydra.sweep.dir={sweep}"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return sweep


def run_script(args: list[str], env_update: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_update or {})}
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def expected_ids(sweep: Path) -> dict[str, str]:
    """run directory -> W&B run id, from each run's checkpoint (independent of the W&B files)."""
    ids = {}
    for ckpt in sweep.glob("*/checkpoint.pt"):
        ids[str(ckpt.parent)] = torch.load(ckpt, weights_only=True)["wandb_run_id"]
    assert len(ids) == 2 and all(ids.values())
    return ids


def test_dry_run_lists_the_offline_runs(sweep):
    proc = run_script([str(sweep), "--dry-run", "--json"], {"WANDB_API_KEY": ""})
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(l) for l in proc.stdout.splitlines()]
    assert {r["run_dir"]: r["run_id"] for r in rows} == expected_ids(sweep)
    for r in rows:
        folder = Path(r["wandb_dir"])
        assert folder.parent == Path(r["run_dir"]) / "wandb" and folder.name.endswith("-" + r["run_id"])
        assert (folder / f"run-{r['run_id']}.wandb").is_file()
        assert r["project"] == "iif" and r["synced"] is False
    assert "2 offline run(s), 2 unsynced" in proc.stderr
    # a multirun's W&B runs: group = experiment, the sweep in the tags, names from the options and seed
    from iif.loggers.wandb_file import read_run_info
    infos = [read_run_info(next(Path(r["wandb_dir"]).glob("run-*.wandb"))) for r in rows]
    assert {i["group"] for i in infos} == {"toy2d"}
    assert all(f"sweep={sweep.name}" in i["tags"] for i in infos)
    assert sorted(i["name"] for i in infos) == ["toy2d-iif-gmm_exact-s0", "toy2d-iif-gmm_exact-s1"]
    # the human-readable listing names each run id and directory
    plain = run_script([str(sweep), "--dry-run"])
    for run_dir, run_id in expected_ids(sweep).items():
        assert any(run_id in line and run_dir in line and "unsynced" in line for line in plain.stdout.splitlines())


def test_synced_marker_is_read(sweep, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(sweep, copy)
    wandb_file = sorted(copy.glob("*/wandb/offline-run-*/run-*.wandb"))[0]
    wandb_file.with_name(wandb_file.name + ".synced").touch()  # what `wandb sync` leaves after an upload
    rows = [json.loads(l) for l in run_script([str(copy), "--dry-run", "--json"]).stdout.splitlines()]
    assert sorted(r["synced"] for r in rows) == [False, True]
    assert [r for r in rows if r["synced"]][0]["wandb_dir"] == str(wandb_file.parent)


def test_not_logged_in_is_one_clear_error(sweep, tmp_path):
    proc = run_script([str(sweep)], {"WANDB_API_KEY": "", "WANDB_IDENTITY_TOKEN_FILE": "",
                                     "NETRC": str(tmp_path / "no-netrc"), "HOME": str(tmp_path)})
    assert proc.returncode == 2
    errors = [l for l in proc.stderr.splitlines() if "error" in l]
    assert len(errors) == 1 and "not logged in" in errors[0] and "wandb login" in errors[0]


def test_unreachable_server_is_one_clear_error(sweep):
    # a port nothing listens on: refused at once, online or offline
    proc = run_script([str(sweep)], {"WANDB_API_KEY": "fake-key-for-test", "WANDB_BASE_URL": "http://127.0.0.1:9"})
    assert proc.returncode == 2
    errors = [l for l in proc.stderr.splitlines() if "error" in l]
    assert len(errors) == 1 and "cannot reach W&B at http://127.0.0.1:9" in errors[0]


def test_sync_calls_wandb_once_per_unsynced_run(sweep, tmp_path, monkeypatch, capsys):
    """With the network check passed, `wandb sync <offline-run-dir>` is called for each unsynced run (a stand-in
    `wandb` records its arguments and writes the marker as the real one does); a second call uploads nothing."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(sweep, copy)
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "wandb"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\nfor d; do :; done\n"
                    "for f in \"$d\"/run-*.wandb; do touch \"$f.synced\"; done\n")
    fake.chmod(0o755)
    monkeypatch.setenv("WANDB_API_KEY", "fake-key-for-test")
    monkeypatch.setattr(wandb_sync, "reachable", lambda url: None)
    monkeypatch.setattr(wandb_sync, "wandb_cli", lambda: str(fake))
    assert wandb_sync.main([str(copy)]) == 0
    lines = calls.read_text().splitlines()
    folders = sorted(str(p) for p in copy.glob("*/wandb/offline-run-*"))
    assert sorted(lines) == sorted(f"sync {f}" for f in folders)
    assert wandb_sync.main([str(copy)]) == 0  # all marked synced now: nothing to do
    assert len(calls.read_text().splitlines()) == 2
    assert "2 offline run(s), 0 unsynced" in capsys.readouterr().err
