"""MNIST / FashionMNIST idx files and CIFAR-10 binary batches read from disk, with clear errors."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from vdu_lightning.data import load_dataset
from vdu_lightning.data.local import load_cifar10, load_mnist_like


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}i", *array.shape
    )
    data = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def make_mnist(root: Path, folder: str = "MNIST", n: int = 20, compress: bool = False):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = np.arange(n, dtype=np.uint8) % 10
    raw = root / folder / "raw"
    for prefix in ("train", "t10k"):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images, compress)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels, compress)
    return images, labels


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_idx_files_load_with_their_pixels_and_labels(tmp_path: Path, compress: bool) -> None:
    images, labels = make_mnist(tmp_path, compress=compress)
    ds = load_mnist_like("mnist", tmp_path, train=True)
    assert ds.images.shape == (20, 1, 28, 28)
    expected = torch.from_numpy(images).float().unsqueeze(1) / 127.5 - 1
    torch.testing.assert_close(ds.images, expected)
    assert ds.labels.tolist() == labels.tolist()
    assert load_mnist_like("mnist", tmp_path, image_size=14).images.shape == (20, 1, 14, 14)


def test_fashion_mnist_uses_its_own_folder_and_the_registry_splits(tmp_path: Path) -> None:
    make_mnist(tmp_path, folder="FashionMNIST", n=40)
    train = load_dataset("fashion_mnist", root=tmp_path, split="train", val_fraction=0.25)
    val = load_dataset("fashion_mnist", root=tmp_path, split="val", val_fraction=0.25)
    test = load_dataset("fashion_mnist", root=tmp_path, split="test")
    assert (len(train), len(val), len(test)) == (30, 10, 40)
    assert val.classes == list(range(10))


def test_missing_mnist_names_the_folder_and_the_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        load_mnist_like("mnist", tmp_path)
    message = str(info.value)
    assert str(tmp_path / "MNIST" / "raw") in message
    assert "train-images-idx3-ubyte" in message and "train-labels-idx1-ubyte" in message
    assert "Nothing is downloaded" in message


def test_truncated_idx_file_is_named(tmp_path: Path) -> None:
    make_mnist(tmp_path)
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte is truncated or corrupt"):
        load_mnist_like("mnist", tmp_path)


def test_corrupt_gzip_is_named(tmp_path: Path) -> None:
    make_mnist(tmp_path, compress=True)
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:30])
    with pytest.raises(ValueError, match="not a valid gzip file"):
        load_mnist_like("mnist", tmp_path)


def make_cifar(root: Path, per_file: int = 3) -> np.ndarray:
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    records = []
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    for k, name in enumerate(names):
        rec = np.zeros((per_file, 3073), dtype=np.uint8)
        rec[:, 0] = (np.arange(per_file) + k) % 10
        rec[:, 1:1025] = 255  # the red plane comes first in every record
        (folder / name).write_bytes(rec.tobytes())
        records.append(rec)
    return np.concatenate(records)


def test_cifar10_binary_batches_load_in_chw_order(tmp_path: Path) -> None:
    records = make_cifar(tmp_path)
    train = load_cifar10(tmp_path, train=True)
    assert train.images.shape == (15, 3, 32, 32)
    assert torch.all(train.images[:, 0] == 1.0) and torch.all(train.images[:, 1:] == -1.0)
    assert train.labels.tolist() == records[:15, 0].tolist()
    assert len(load_cifar10(tmp_path, train=False)) == 3
    assert load_cifar10(tmp_path, image_size=16).images.shape == (15, 3, 16, 16)


def test_cifar10_python_version_is_refused_without_unpickling(tmp_path: Path) -> None:
    py = tmp_path / "cifar-10-batches-py"
    py.mkdir()
    # A pickle that would create a file if anything unpickled it.
    marker = tmp_path / "pwned"
    payload = (
        b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    )
    (py / "data_batch_1").write_bytes(payload)
    with pytest.raises(FileNotFoundError, match="never unpickles"):
        load_cifar10(tmp_path)
    assert not marker.exists()


def test_cifar10_missing_and_truncated_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-bin.*data_batch_1\.bin"):
        load_cifar10(tmp_path)
    make_cifar(tmp_path)
    bad = tmp_path / "cifar-10-batches-bin" / "data_batch_3.bin"
    bad.write_bytes(bad.read_bytes()[:-7])
    with pytest.raises(ValueError, match=r"data_batch_3\.bin is truncated or corrupt"):
        load_cifar10(tmp_path)
