"""Data sets by name, and the train / val / test parts every datamodule uses.

``train`` and ``val`` are a stratified, seeded split of the training pool (every class in
both). ``test`` is the official test files for the data sets that have them; the embedded
sets have none, so their ``test`` is the same held-out part as ``val``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vdu_lightning.data.datasets import LabeledImages, stratified_split
from vdu_lightning.data.embedded import load_digits, load_mnist5k
from vdu_lightning.data.folder import CaptionedImageFolder
from vdu_lightning.data.hf import HFColumns, HFImages, dataset_properties, read_images
from vdu_lightning.data.local import load_cifar10, load_mnist_like
from vdu_lightning.hub import split_hub_id

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class DatasetInfo:
    """What is known of a named data set without reading it."""

    channels: int
    image_size: int  # native side, the default when a config gives none
    classes: tuple[int, ...]  # empty when the labels are only known after reading (folders)
    needs_root: bool


_TEN = tuple(range(10))
DATASETS: dict[str, DatasetInfo] = {
    "mnist5k": DatasetInfo(channels=1, image_size=16, classes=_TEN, needs_root=False),
    "digits": DatasetInfo(channels=1, image_size=8, classes=_TEN, needs_root=False),
    "mnist": DatasetInfo(channels=1, image_size=28, classes=_TEN, needs_root=True),
    "fashion_mnist": DatasetInfo(channels=1, image_size=28, classes=_TEN, needs_root=True),
    "cifar10": DatasetInfo(channels=3, image_size=32, classes=_TEN, needs_root=True),
    "folder": DatasetInfo(channels=3, image_size=0, classes=(), needs_root=True),
}


def dataset_info(name: str, columns: HFColumns | None = None) -> DatasetInfo:
    """The ``DatasetInfo`` of ``name``: a key of ``DATASETS``, or else a Hugging Face dataset
    (a Hub ID or a local folder, see ``data.hf``) whose first image and label feature are
    read; an error lists the known names."""
    if name in DATASETS:
        return DATASETS[name]
    if split_hub_id(name) is None and not Path(name).is_dir():
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}; or a "
                         "Hugging Face dataset: a Hub ID (owner/name) or a local folder")
    channels, side, classes = dataset_properties(name, columns or HFColumns())
    return DatasetInfo(channels=channels, image_size=side, classes=classes, needs_root=False)


def _hugging_face_part(name: str, image_size: int | None, split: str, val_fraction: float,
                       split_seed: int, columns: HFColumns,
                       exclude: Mapping[str, Any] | None) -> HFImages:
    """As ``load_dataset``, for a Hugging Face dataset: its own ``test`` split if it has
    one, ``train`` and ``val`` a stratified split of its ``train`` split; rows matching
    ``exclude`` (a ``forget_where``) left out."""
    info = dataset_info(name, columns)
    size = image_size or info.image_size
    if split == "test":
        test = read_images(name, "test", columns, size, info.channels, exclude=exclude)
        if test is not None:
            return test
    pool = read_images(name, "train", columns, size, info.channels, exclude=exclude)
    train, val = stratified_split(pool.labels, val_fraction, split_seed)
    return pool.subset(train if split == "train" else val)


def _pool(name: str, root: str | Path | None, image_size: int | None, train: bool):
    if name == "mnist5k":
        return load_mnist5k(image_size or DATASETS[name].image_size)
    if name == "digits":
        return load_digits(image_size or DATASETS[name].image_size)
    if name in ("mnist", "fashion_mnist"):
        return load_mnist_like(name, root, train=train, image_size=image_size)
    if name == "cifar10":
        return load_cifar10(root, train=train, image_size=image_size)
    return CaptionedImageFolder(root, image_size=image_size)


def load_dataset(
    name: str,
    root: str | Path | None = None,
    image_size: int | None = None,
    split: str = "train",
    val_fraction: float = 0.1,
    split_seed: int = 0,
    columns: HFColumns | None = None,
    exclude: Mapping[str, Any] | None = None,
) -> LabeledImages | CaptionedImageFolder | HFImages:
    """One part of a named data set, with items ``{"image", "label"[, "caption"]}``.

    Args:
        name: a key of ``DATASETS`` (``mnist5k``, ``digits``, ``mnist``, ``fashion_mnist``,
            ``cifar10``, ``folder``), or a Hugging Face dataset: a Hub ID or a local folder
            that ``datasets`` reads (see ``data.hf``).
        root: the folder holding the files; needed by every set but the embedded ones.
        image_size: side of the images; None gives the set's default.
        split: ``train``, ``val`` or ``test``.
        val_fraction: fraction of each class held out for ``val``.
        split_seed: seed of the train/val split (fixed, so runs agree on it).
        columns: the columns (and revision) of a Hugging Face dataset.
        exclude: for a Hugging Face dataset, rows to leave out (``column: value``).

    Example:
        >>> len(load_dataset("digits", split="val", val_fraction=0.1))
        179
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if name not in DATASETS:
        return _hugging_face_part(name, image_size, split, val_fraction, split_seed,
                                  columns or HFColumns(), exclude)
    info = dataset_info(name)
    if info.needs_root and root is None:
        raise ValueError(f"dataset {name!r} is read from disk: set `root` to its folder")
    has_test_files = info.needs_root and name != "folder"
    if split == "test" and has_test_files:
        return _pool(name, root, image_size, train=False)
    pool = _pool(name, root, image_size, train=True)
    train, val = stratified_split(pool.labels, val_fraction, split_seed)
    return pool.subset(train if split == "train" else val)
