"""MNIST, FashionMNIST and CIFAR-10 read from files already on disk; nothing is downloaded.

MNIST and FashionMNIST use torchvision's layout (``<root>/MNIST/raw/*-idx?-ubyte``, plain or
``.gz``). CIFAR-10 is read from its *binary* version (``<root>/cifar-10-batches-bin``): the
python version is a set of pickles, and this project never unpickles a user's file.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

from vdu_lightning.data.datasets import LabeledImages, check_image_size, resize_and_scale

#: Public name → torchvision's folder name under ``root``.
MNIST_LIKE_FOLDERS: dict[str, str] = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}

CIFAR10_BIN_FOLDER = "cifar-10-batches-bin"
CIFAR10_PY_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR10_TEST_FILES = ("test_batch.bin",)
_CIFAR_RECORD = 1 + 3 * 32 * 32

#: idx type byte 0x08 = unsigned byte; magic = 0x00 0x00 <type> <number of dimensions>.
_IDX_UBYTE = 0x08


def _missing_files_error(folder: Path, expected: list[str], what: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{what} not found: searched {folder} for the files [{', '.join(expected)}]. Nothing "
        "is downloaded at run time: place the files there, or set `root` to the folder that "
        "holds them."
    )


def _read_maybe_gzip(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".gz":
        try:
            return gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as err:
            raise ValueError(
                f"{path} is not a valid gzip file (truncated or corrupt): {err}"
            ) from err
    return data


def _parse_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an idx file of unsigned bytes with ``ndim`` dimensions (big-endian header)."""
    data = _read_maybe_gzip(path)
    header = 4 + 4 * ndim
    if len(data) < header or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an idx file (bad magic number or truncated header)")
    if data[2] != _IDX_UBYTE or data[3] != ndim:
        raise ValueError(
            f"{path} has idx type 0x{data[2]:02x} with {data[3]} dimensions; expected unsigned "
            f"bytes (0x08) with {ndim} dimensions"
        )
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise ValueError(
            f"{path} is truncated or corrupt: header says {dims} ({expected} bytes) but the file "
            f"holds {len(data)} bytes"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def load_mnist_like(
    name: str, root: str | Path, train: bool = True, image_size: int | None = None
) -> LabeledImages:
    """MNIST or FashionMNIST from torchvision's on-disk layout.

    Args:
        name: ``"mnist"`` or ``"fashion_mnist"``.
        root: the folder holding ``MNIST/raw`` (or ``FashionMNIST/raw``), i.e. torchvision's
            ``root`` argument.
        train: the official training files (60,000 images) or the test files (10,000).
        image_size: side of the returned images; None keeps the native 28.

    Returns:
        ``LabeledImages`` ``[N, 1, S, S]`` in [-1, 1] with labels 0..9.

    Raises:
        FileNotFoundError: the idx files are not there (the message lists them).
        ValueError: a file is corrupt or truncated (the message names it).

    Example:
        >>> ds = load_mnist_like("mnist", "~/data", train=False)  # doctest: +SKIP
        >>> ds.images.shape  # doctest: +SKIP
        torch.Size([10000, 1, 28, 28])
    """
    if name not in MNIST_LIKE_FOLDERS:
        raise ValueError(f"name must be one of {sorted(MNIST_LIKE_FOLDERS)}, got {name!r}")
    size = 28 if image_size is None else check_image_size(image_size)
    folder = Path(root).expanduser() / MNIST_LIKE_FOLDERS[name] / "raw"
    prefix = "train" if train else "t10k"
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    paths = [_find_idx(folder, stem) for stem in stems]
    images_path, labels_path = paths[0], paths[1]
    if images_path is None or labels_path is None:
        expected = [f"{stem} (or {stem}.gz)" for stem in stems]
        raise _missing_files_error(folder, expected, f"{name} ({'train' if train else 'test'})")
    images = _parse_idx(images_path, ndim=3)
    labels = _parse_idx(labels_path, ndim=1)
    if len(images) != len(labels):
        raise ValueError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} "
            "labels; the two files must come from the same release"
        )
    pixels = torch.from_numpy(images.copy())
    return LabeledImages(
        resize_and_scale(pixels, size, 255.0), torch.from_numpy(labels.astype(np.int64))
    )


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    data = np.fromfile(path, dtype=np.uint8)
    if data.size == 0 or data.size % _CIFAR_RECORD:
        raise ValueError(
            f"{path} is truncated or corrupt: {data.size} bytes is not a whole number of "
            f"{_CIFAR_RECORD}-byte CIFAR-10 records (1 label byte + 3072 pixel bytes)"
        )
    records = data.reshape(-1, _CIFAR_RECORD)
    labels = records[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise ValueError(
            f"{path} is corrupt or not a CIFAR-10 binary batch: label byte {labels.max()} "
            "found, labels must be 0..9 (CIFAR-100's binary format is not supported)"
        )
    # 1024 R, then 1024 G, then 1024 B, each row-major 32×32: that is already CHW order.
    return records[:, 1:].reshape(-1, 3, 32, 32), labels


def load_cifar10(
    root: str | Path, train: bool = True, image_size: int | None = None
) -> LabeledImages:
    """CIFAR-10 from its binary version (``<root>/cifar-10-batches-bin/*.bin``).

    Args:
        root: the folder holding ``cifar-10-batches-bin`` (unpacked cifar-10-binary.tar.gz).
        train: ``data_batch_1.bin`` … ``data_batch_5.bin`` or ``test_batch.bin``.
        image_size: side of the returned images; None keeps the native 32.

    Returns:
        ``LabeledImages`` ``[N, 3, S, S]`` in [-1, 1] with labels 0..9.

    Raises:
        FileNotFoundError: the binary files are not there; also when only the pickled python
            version is present, which this project refuses to load.
        ValueError: a file is corrupt or truncated (the message names it).

    Example:
        >>> ds = load_cifar10("~/data", train=False)  # doctest: +SKIP
        >>> ds.images.shape  # doctest: +SKIP
        torch.Size([10000, 3, 32, 32])
    """
    size = 32 if image_size is None else check_image_size(image_size)
    base = Path(root).expanduser()
    folder = base / CIFAR10_BIN_FOLDER
    names = CIFAR10_TRAIN_FILES if train else CIFAR10_TEST_FILES
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        if (base / CIFAR10_PY_FOLDER).is_dir():
            raise FileNotFoundError(
                f"found {base / CIFAR10_PY_FOLDER} (CIFAR-10's python version) but not "
                f"{folder}: the python version is a set of pickles, and this project never "
                "unpickles a user's file because unpickling can run arbitrary code. Download "
                "the binary version (cifar-10-binary.tar.gz from the CIFAR-10 site, "
                f"https://www.cs.toronto.edu/~kriz/cifar.html) and unpack it into {base}; it "
                f"provides [{', '.join(names)}]."
            )
        raise _missing_files_error(folder, list(names), f"cifar10 ({'train' if train else 'test'})")
    parts = [_read_cifar_batch(folder / n) for n in names]
    pixels = torch.from_numpy(np.concatenate([p for p, _ in parts]))
    labels = torch.from_numpy(np.concatenate([lab for _, lab in parts]))
    return LabeledImages(resize_and_scale(pixels, size, 255.0), labels)
