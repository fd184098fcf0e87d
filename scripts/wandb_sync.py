"""Find the offline W&B runs under run directories, list them, and upload the ones not yet synced.

    python scripts/wandb_sync.py --dry-run            # list every offline run under outputs/ (works offline)
    python scripts/wandb_sync.py outputs/multirun     # upload the unsynced ones with `wandb sync`
    python scripts/wandb_sync.py --json --dry-run     # the listing as JSON lines

An iif run with ``logger=wandb`` (offline by default) writes ``<run_dir>/wandb/offline-run-<time>-<id>/run-<id>.wandb``.
`wandb sync` marks an uploaded run with ``run-<id>.wandb.synced`` beside it; this script reads that marker, so a
second call uploads only what is new. Run it on a machine with internet (a login node), logged in to W&B
(``wandb login`` or ``WANDB_API_KEY`` in the environment). Exit status: 0 all synced (or dry run), 1 a sync failed,
2 not logged in or W&B unreachable (nothing attempted).
"""
from __future__ import annotations

import argparse
import json
import netrc
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

DEFAULT_BASE_URL = "https://api.wandb.ai"


@dataclass
class OfflineRun:
    run_id: str
    project: str | None
    name: str | None
    run_dir: str      # the iif run directory (holds config.yaml, metrics.json, checkpoint.pt, wandb/)
    wandb_dir: str    # the offline run folder that `wandb sync` takes
    synced: bool


def find_offline_runs(roots: list[Path]) -> list[OfflineRun]:
    """Every ``wandb/offline-run-*/run-*.wandb`` under ``roots`` (sorted by path)."""
    from iif.loggers.wandb_file import read_run_info

    runs = []
    for root in roots:
        for f in sorted(Path(root).rglob("offline-run-*/run-*.wandb")):
            folder = f.parent
            try:
                info = read_run_info(f)
            except Exception as e:  # a run killed while writing its header: still list it, by its file name
                print(f"wandb_sync: warning: cannot read {f}: {e}", file=sys.stderr)
                info = {"run_id": None, "project": None, "name": None}
            runs.append(OfflineRun(
                run_id=info["run_id"] or f.stem.removeprefix("run-"), project=info["project"], name=info["name"],
                run_dir=str(folder.parent.parent if folder.parent.name == "wandb" else folder.parent),
                wandb_dir=str(folder), synced=f.with_name(f.name + ".synced").exists()))
    return runs


def base_url() -> str:
    return os.environ.get("WANDB_BASE_URL") or DEFAULT_BASE_URL


def logged_in(url: str) -> bool:
    """An API key in the environment, an identity-token file, or a ``wandb login`` entry in ``~/.netrc``."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    try:
        return bool(path.is_file() and netrc.netrc(path).authenticators(urlparse(url).hostname or ""))
    except (netrc.NetrcParseError, OSError):
        return False


def reachable(url: str, timeout: float = 5.0) -> str | None:
    """``None`` if a TCP connection to the W&B server opens, else the reason."""
    u = urlparse(url)
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        socket.create_connection((u.hostname, port), timeout=timeout).close()
        return None
    except OSError as e:
        return f"{type(e).__name__}: {e}"


def wandb_cli() -> str:
    """The ``wandb`` executable of this Python's environment (the venv), else the one on PATH."""
    here = Path(sys.executable).parent / "wandb"
    found = str(here) if here.exists() else shutil.which("wandb")
    if not found:
        raise SystemExit("wandb_sync: error: the `wandb` command is not installed in this environment")
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("roots", nargs="*", type=Path, default=[Path("outputs")], help="trees to search (default outputs/)")
    p.add_argument("--dry-run", action="store_true", help="only list the runs (no network, no login needed)")
    p.add_argument("--include-synced", action="store_true", help="upload runs already marked synced again")
    p.add_argument("--json", action="store_true", help="list as JSON lines")
    p.add_argument("--project", help="upload to this W&B project instead of the one the run recorded")
    p.add_argument("--entity", help="upload to this W&B entity")
    args = p.parse_args(argv)

    for root in args.roots:
        if not root.exists():
            print(f"wandb_sync: error: {root} does not exist", file=sys.stderr)
            return 2
    runs = find_offline_runs(args.roots)
    for r in runs:
        if args.json:
            print(json.dumps(asdict(r)))
        else:
            print(f"{r.run_id}  {'synced  ' if r.synced else 'unsynced'}  project={r.project}  {r.run_dir}")
    todo = [r for r in runs if args.include_synced or not r.synced]
    print(f"{len(runs)} offline run(s), {len(runs) - sum(r.synced for r in runs)} unsynced"
          + (f"; {len(todo)} to upload" if not args.dry_run else ""), file=sys.stderr)
    if args.dry_run or not todo:
        return 0

    url = base_url()
    if not logged_in(url):
        print(f"wandb_sync: error: not logged in to W&B ({url}); run `wandb login` or set WANDB_API_KEY, "
              "then run this again (nothing was uploaded)", file=sys.stderr)
        return 2
    why = reachable(url)
    if why is not None:
        print(f"wandb_sync: error: cannot reach W&B at {url} ({why}); run this on a machine with internet, "
              "e.g. a login node (nothing was uploaded)", file=sys.stderr)
        return 2
    cmd = [wandb_cli(), "sync"]
    cmd += ["--include-synced"] if args.include_synced else []
    cmd += ["--project", args.project] if args.project else []
    cmd += ["--entity", args.entity] if args.entity else []
    failed = []
    for r in todo:
        proc = subprocess.run([*cmd, r.wandb_dir])
        if proc.returncode != 0:
            failed.append(r)
            print(f"wandb_sync: error: `wandb sync {r.wandb_dir}` exited {proc.returncode}", file=sys.stderr)
    print(f"uploaded {len(todo) - len(failed)} of {len(todo)} run(s)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
