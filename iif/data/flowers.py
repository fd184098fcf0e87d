"""``flowers``: Oxford Flowers-102 in torchvision's layout (``ROOT/flowers-102/{jpg/, imagelabels.mat, setid.mat}``),
loaded as square images on the ``[-1, 1]`` scale.

As in the IIF paper: each image is centre-cropped to a square and resized (64x64 by default); the base model is
trained on ``train+test`` (7169 images) and the ``val`` split (1020) is held out for tests. Unlike MNIST there is no
offline source: torchvision downloads the official files from the VGG site (``iif-data flowers`` with internet), or
they are copied in by hand. torchvision checks the two ``.mat`` files by md5; this module also checks that every
image the splits name is there, so a half-unpacked ``102flowers.tgz`` is reported, not half-loaded.
"""
from __future__ import annotations

import contextlib
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from iif.utils import ConfigError, RunError, progress_enabled

Tensor = torch.Tensor

SPLITS = ("train", "val", "test", "train+test")


def _base(root: Path) -> Path:
    return Path(root) / "flowers-102"


def _one_line(e: BaseException, limit: int = 160) -> str:
    s = " ".join(str(e).split()) or type(e).__name__
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _problem(root: Path) -> str | None:
    """Why ``root`` holds no usable Flowers-102 (``None`` if it does), by torchvision's own checks plus one: every
    image that ``setid.mat`` names exists under ``jpg/``."""
    from torchvision.datasets import Flowers102
    from torchvision.datasets.utils import check_integrity

    base = _base(root)
    files = {key: name for key, (name, _) in Flowers102._file_dict.items()}
    missing = [f"{files['image']} unpacked to jpg/"] if not (base / "jpg").is_dir() else []
    missing += [files[k] for k in ("label", "setid") if not (base / files[k]).is_file()]
    if missing:
        return f"missing {', '.join(missing)} in {base}"
    for key in ("label", "setid"):
        name, md5 = Flowers102._file_dict[key]
        if not check_integrity(str(base / name), md5):
            return f"{base / name} is corrupted (md5 differs from torchvision's)"
    from scipy.io import loadmat

    ids = loadmat(base / files["setid"], squeeze_me=True)
    wanted = sorted({int(i) for key in Flowers102._splits_map.values() for i in np.atleast_1d(ids[key])})
    absent = [i for i in wanted if not (base / "jpg" / f"image_{i:05d}.jpg").is_file()]
    if absent:
        return (f"{len(absent)} of the {len(wanted)} images are missing from {base / 'jpg'} "
                f"(first: image_{absent[0]:05d}.jpg; a partly unpacked {files['image']}?)")
    return None


def _how_to_get(root: Path) -> str:
    base = _base(root)
    return (f"torchvision cannot fetch Flowers-102 offline: run `iif-data flowers --root {root}` on a machine with "
            f"internet (torchvision's download=True), or copy the official files there (102flowers.tgz unpacked "
            f"to {base}/jpg/, imagelabels.mat and setid.mat in {base}/)")


def _download_flowers(root: Path) -> None:
    """torchvision's download of the official files (needs internet). Its messages go to stderr, not stdout."""
    from torchvision.datasets import Flowers102

    with contextlib.redirect_stdout(sys.stderr):
        Flowers102(root, split="train", download=True)


def ensure_flowers(root: str | os.PathLike, download: bool = False) -> Path:
    """Make sure ``root/flowers-102/`` holds Flowers-102 in torchvision's layout; returns ``root``.

    Args:
        download: download it with torchvision if missing (needs internet; the CLI ``iif-data flowers`` does).

    Raises:
        RunError: one line naming why there is no data and how to get it.
    """
    root = Path(root)
    problem = _problem(root)
    if problem is None:
        return root
    if download:
        try:
            _download_flowers(root)
        except Exception as e:  # noqa: BLE001 - whatever the cause, the data is not there: say so in one line
            raise RunError(f"Flowers-102 not found ({problem}) and torchvision's download failed "
                           f"({_one_line(e)}); {_how_to_get(root)}") from None
        problem = _problem(root)
        if problem is None:
            return root
    raise RunError(f"Flowers-102 not found ({problem}); {_how_to_get(root)}")


def _open_reduced(size: int):
    """A loader for ``Flowers102``: RGB images, JPEGs decoded at a reduced scale (``draft``) that keeps the short
    side >= ``2 * size``, several times faster than a full decode, and no loss at the final ``size``."""
    from PIL import Image

    def load(path) -> "Image.Image":
        with Image.open(path) as im:
            im.draft("RGB", (2 * size, 2 * size))
            return im.convert("RGB")

    return load


def _centre_square(size: int):
    """A transform: centre crop to a square of the short side, bicubic (antialiased) resize to ``size``;
    returns ``[3, size, size]`` uint8."""
    from PIL import Image

    def transform(im) -> Tensor:
        w, h = im.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        im = im.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC)
        return torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1)

    return transform


def load_flowers(root: str | os.PathLike, split: str = "train", size: int = 64,
                 download: bool = False) -> tuple[Tensor, Tensor]:
    """Flowers-102 as tensors, through ``torchvision.datasets.Flowers102``: centre-cropped, resized, in ``[-1, 1]``.

    Args:
        root: the folder holding ``flowers-102/``.
        split: ``"train"`` (1020 images), ``"val"`` (1020), ``"test"`` (6149) or ``"train+test"`` (7169, the IIF
            paper's training set for the base model; ``val`` is for tests).
        size: side of the returned images.
        download: download missing data with torchvision (needs internet); default: missing data is a ``RunError``.

    Returns:
        images ``[N, 3, size, size]`` float32 in ``[-1, 1]`` (0 -> -1, 255 -> 1), labels ``[N]`` int64 in 0..101.
    """
    if split not in SPLITS:
        raise ConfigError(f"Flowers-102 split must be one of {', '.join(SPLITS)}, got {split!r}")
    if int(size) != size or size < 1:
        raise ConfigError(f"Flowers-102 size must be a positive integer, got {size!r}")
    root = ensure_flowers(root, download=download)
    from torchvision.datasets import Flowers102

    sets = [Flowers102(root, split=s, transform=_centre_square(size), loader=_open_reduced(size), download=False)
            for s in split.split("+")]
    n = sum(len(ds) for ds in sets)
    images = torch.empty(n, 3, size, size, dtype=torch.uint8)
    labels = torch.empty(n, dtype=torch.int64)
    i = 0
    pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))  # PIL decodes and resizes without the GIL
    try:
        with tqdm(total=n, desc=f"flowers {split} {size}x{size}", unit="img", disable=not progress_enabled()) as bar:
            for name, ds in zip(split.split("+"), sets):
                items = pool.map(ds.__getitem__, range(len(ds)))
                for j in range(len(ds)):
                    try:
                        images[i], labels[i] = next(items)
                    except OSError as e:  # a truncated or unreadable JPEG
                        raise RunError(f"cannot read image {j} of the Flowers-102 {name!r} split under "
                                       f"{_base(root) / 'jpg'}: {_one_line(e)}") from None
                    i += 1
                    bar.update(1)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return images.float().div_(127.5).sub_(1.0), labels
