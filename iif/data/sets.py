"""Datasets as configuration objects (``data:`` of a pretraining stage or an evaluator): each loads its splits once,
on first use, as tensors ``(images [N, C, H, W] in [-1, 1], labels [N])``, and says by :meth:`key` what identifies
its contents (the pretraining cache is keyed on it; the folder it lives in is not part of the key).

    data: {_target_: iif.data.sets.MNIST, root: ${data_dir}, size: 16}
"""
from __future__ import annotations

import torch

Tensor = torch.Tensor


class ImageData:
    """A labelled image dataset with a train and a test split.

    Args:
        root: the data folder (the run's ``data_dir``; ``IIF_DATA`` moves it).
        size: images are resized to ``size x size``.
    """

    splits = {"train": "train", "test": "test"}

    def __init__(self, root: str, size: int):
        if size < 4:
            raise ValueError(f"data.size must be >= 4, got {size}")
        self.root, self.size = str(root), int(size)
        self._cache: dict[str, tuple[Tensor, Tensor]] = {}

    def key(self) -> dict:
        return {"dataset": type(self).__name__, "size": self.size}

    def load(self, split: str) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def split(self, name: str) -> tuple[Tensor, Tensor]:
        if name not in self._cache:
            self._cache[name] = self.load(self.splits[name])
        return self._cache[name]

    def train(self) -> tuple[Tensor, Tensor]:
        return self.split("train")

    def test(self) -> tuple[Tensor, Tensor]:
        return self.split("test")

    def of_classes(self, split: str, classes) -> Tensor:
        """The images of ``split`` whose label is in ``classes``: ``[n, C, H, W]``."""
        images, labels = self.split(split)
        keep = torch.isin(labels, torch.as_tensor(list(classes)))
        return images[keep]


class MNIST(ImageData):
    """MNIST digits (1 x size x size), fetched by the data step when missing (``iif-data mnist``)."""

    def load(self, split):
        from iif.data.mnist import load_mnist

        return load_mnist(self.root, split=split, size=self.size)


class Flowers102(ImageData):
    """Oxford Flowers-102 (3 x size x size, centre-cropped); the IIF paper trains its base model on the train and
    test splits and takes test images from the validation split. Read from a local copy (``iif-data flowers``)."""

    splits = {"train": "train+test", "test": "val"}

    def load(self, split):
        from iif.data.flowers import load_flowers

        return load_flowers(self.root, split=split, size=self.size)
