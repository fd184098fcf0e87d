"""``iif.data``: the real image datasets of the experiments (MNIST, Oxford Flowers-102) as tensors on the data's
``[-1, 1]`` scale, read through torchvision's own dataset classes so that a folder prepared by torchvision (or by
``iif-data``) works unchanged.

Datasets are loaded whole into memory (MNIST: 70k 28x28 images; Flowers-102: 8189 images, centre-cropped and resized
once at load time): the experiments train small base models on them, and a tensor is the simplest thing to shuffle.
Missing data is one ``RunError`` line naming the cause and how to get the files (``iif-data {mnist,flowers}``).
"""
from __future__ import annotations

import os
from pathlib import Path


def default_data_root() -> Path:
    """Where datasets live unless told otherwise: ``$IIF_DATA``, else ``outputs/data`` (relative to the cwd)."""
    return Path(os.environ.get("IIF_DATA") or "outputs/data")


from iif.data.flowers import ensure_flowers, load_flowers  # noqa: E402
from iif.data.mnist import ensure_mnist, load_mnist  # noqa: E402

__all__ = ["default_data_root", "ensure_flowers", "ensure_mnist", "load_flowers", "load_mnist"]
