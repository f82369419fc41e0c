"""Hugging Face ``datasets``: a Hub dataset ID or a local folder, as labelled images in memory.

A Hub ID (``uoft-cs/cifar10``, ``owner/name@revision``) is fetched into huggingface_hub's
cache (only data files: parquet, arrow, JSON, CSV, images; never a loading script or a
pickle) and ``HF_HUB_OFFLINE=1`` reads that cache alone; a local folder is anything
``datasets.load_dataset`` reads from a directory (parquet files, an ``imagefolder``). Images
come from ``image_column``, labels from ``label_column`` and captions from
``caption_column``, as diffusers' training scripts name them.

``datasets`` is an optional dependency: ``pip install "vdu_lightning[hf]"``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from vdu_lightning.data.folder import image_tensor
from vdu_lightning.hub import not_found, split_hub_id

#: The files fetched for a Hub dataset: its data and its card (whose YAML names the splits).
DATA_FILES = ["*.parquet", "*.arrow", "*.json", "*.jsonl", "*.csv", "*.md", "*.txt",
              "*.png", "*.jpg", "*.jpeg", "*.webp"]


@dataclass(frozen=True)
class HFColumns:
    """Which columns of a Hugging Face dataset hold what (``label`` or ``caption`` may be
    None), and which revision of a Hub ID to read."""

    image: str = "image"
    label: str | None = "label"
    caption: str | None = None
    revision: str | None = None


class HFImages(Dataset):
    """Rows of a Hugging Face dataset, each image decoded when its item is read (a large
    dataset never sits in memory as pixels): items ``{"image": [C, S, S] in [-1, 1], "label",
    ["caption"]}``; ``labels`` are read up front from their column alone."""

    def __init__(self, table: Any, columns: HFColumns, image_size: int, channels: int,
                 rows: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> None:
        self.table, self.columns = table, columns
        self.image_size, self.channels = image_size, channels
        self.rows = torch.arange(len(table)) if rows is None else rows
        self.labels = _labels(table, columns) if labels is None else labels

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.table[int(self.rows[index])]
        item = {"image": image_tensor(row[self.columns.image], self.image_size, self.channels),
                "label": int(self.labels[index])}
        if self.columns.caption is not None:
            item["caption"] = str(row[self.columns.caption])
        return item

    def subset(self, indices: torch.Tensor | Sequence[int]) -> HFImages:
        """A view on the chosen items (nothing decoded)."""
        index = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        return HFImages(self.table, self.columns, self.image_size, self.channels,
                        self.rows[index], self.labels[index])

    @property
    def classes(self) -> list[int]:
        """The distinct labels present, sorted."""
        return [int(c) for c in torch.unique(self.labels)]


def _labels(table: Any, columns: HFColumns) -> torch.Tensor:
    if columns.label is None:
        return torch.full((len(table),), -1, dtype=torch.int64)
    return torch.as_tensor(_integer_labels(list(table[columns.label]), columns),
                           dtype=torch.int64)


def _integer_labels(values: Sequence[Any], columns: HFColumns) -> list[int]:
    """``values`` if they are all integers, else an error naming the label column."""
    wrong = [v for v in values if not isinstance(v, int) or isinstance(v, bool)]
    if wrong:
        raise ValueError(f"label_column {columns.label!r} must hold integer labels (a "
                         f"ClassLabel or ints), got e.g. {wrong[0]!r}; set label_column: null "
                         "for unlabelled data")
    return list(values)


def _datasets() -> Any:
    try:
        import datasets
    except ImportError as err:
        raise ImportError("a Hugging Face dataset needs the `datasets` package: "
                          "pip install \"vdu_lightning[hf]\"") from err
    return datasets


def dataset_folder(name: str, revision: str | None = None) -> Path:
    """The local folder of ``name``: itself, or the cached snapshot of a Hub dataset ID."""
    hub = split_hub_id(name)
    if hub is None:
        if not Path(name).is_dir():
            raise FileNotFoundError(f"dataset folder not found: {name}")
        return Path(name)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    repo_id, at_revision = hub
    if revision and at_revision and revision != at_revision:
        raise ValueError(f"dataset {name} names revision {at_revision!r} but revision="
                         f"{revision!r} was given too: give one")
    revision = at_revision or revision
    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", revision=revision,
                                      allow_patterns=DATA_FILES))
    except (HfHubHTTPError, OSError) as err:
        where = repo_id + (f"@{revision}" if revision else "")
        raise not_found(f"dataset {where}", err, repo_id, "dataset") from err


@functools.lru_cache(maxsize=8)
def _load_folder(folder: str) -> Any:
    """``datasets.load_dataset`` of a local folder, once per process (its Arrow files are
    memory-mapped: nothing is decoded here)."""
    return _datasets().load_dataset(folder)


def read_split(name: str, split: str, columns: HFColumns) -> Any | None:
    """One split of the dataset as a ``datasets.Dataset`` (None if it has no such split),
    its columns checked."""
    loaded = _load_folder(str(dataset_folder(name, columns.revision)))
    if split not in loaded:
        return None
    part = loaded[split]
    wanted = [c for c in (columns.image, columns.label, columns.caption) if c is not None]
    missing = [c for c in wanted if c not in part.column_names]
    if missing:
        raise ValueError(f"dataset {name!r} has no column {missing} (its columns: "
                         f"{part.column_names}): set image_column / label_column / "
                         "caption_column")
    return part


def dataset_properties(name: str, columns: HFColumns) -> tuple[int, int, tuple[int, ...]]:
    """(channels, image side, classes) of the ``train`` split, from its first image and its
    label feature (a ``ClassLabel``'s names, else the labels present)."""
    train = read_split(name, "train", columns)
    if train is None:
        raise ValueError(f"dataset {name!r} has no 'train' split")
    if len(train) == 0:
        raise ValueError(f"the 'train' split of dataset {name!r} is empty")
    first = train[0][columns.image]
    if not hasattr(first, "mode"):
        raise ValueError(f"image_column {columns.image!r} of dataset {name!r} holds "
                         f"{type(first).__name__}, not images: set image_column")
    channels = 1 if first.mode in ("1", "L", "I", "F") or first.mode.startswith("I;16") else 3
    classes: tuple[int, ...] = ()
    if columns.label is not None:
        feature = train.features[columns.label]
        classes = (tuple(range(feature.num_classes)) if hasattr(feature, "num_classes")
                   else tuple(sorted(_integer_labels(train.unique(columns.label), columns))))
    return channels, min(first.size), classes


def read_images(name: str, split: str, columns: HFColumns, image_size: int, channels: int,
                where: Mapping[str, Any] | None = None,
                exclude: Mapping[str, Any] | None = None) -> HFImages | None:
    """The images of ``split``, decoded when read, at ``image_size``: the rows matching every
    ``column: value`` of ``where`` (a list value: any of its items), without those matching
    ``exclude``; captioned if ``columns.caption`` is set. None if there is no such split."""
    part = read_split(name, split, columns)
    if part is None:
        return None
    for condition, keep in ((where, True), (exclude, False)):
        if condition:
            check_filter_columns(name, part, condition)
            wanted = [set(v) if isinstance(v, (list, tuple)) else {v}
                      for v in condition.values()]
            # Only the filter's columns are read: no image is decoded to filter.
            part = part.filter(
                lambda *values: all(v in w for v, w in zip(values, wanted)) == keep,
                input_columns=list(condition))
    return HFImages(part, columns, image_size, channels)


def check_filter_columns(name: str, part: Any, condition: Mapping[str, Any]) -> None:
    """Refuse a filter on columns the dataset does not have, naming those it has."""
    unknown = [c for c in condition if c not in part.column_names]
    if unknown:
        raise ValueError(f"forget_where names columns {unknown} that dataset {name!r} does "
                         f"not have (its columns: {part.column_names})")
