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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vdu_lightning.data.datasets import LabeledImages, resize_and_scale
from vdu_lightning.hub import HubModelNotFound, split_hub_id

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


class CaptionedImages(LabeledImages):
    """``LabeledImages`` whose items also carry a ``caption``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor,
                 captions: Sequence[str]) -> None:
        super().__init__(images, labels)
        if len(captions) != len(labels):
            raise ValueError(f"{len(captions)} captions for {len(labels)} images")
        self.captions = list(captions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**super().__getitem__(index), "caption": self.captions[index]}

    def subset(self, indices: torch.Tensor | Sequence[int]) -> CaptionedImages:
        index = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        part = super().subset(index)
        return CaptionedImages(part.images, part.labels, [self.captions[i] for i in index])


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
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo_id, at_revision = hub
    where = repo_id + (f"@{revision or at_revision}" if revision or at_revision else "")
    try:
        return Path(snapshot_download(repo_id, repo_type="dataset",
                                      revision=revision or at_revision,
                                      allow_patterns=DATA_FILES))
    except LocalEntryNotFoundError as err:
        raise HubModelNotFound(
            f"dataset {where} is not a local folder, and not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE})" + (
                ": HF_HUB_OFFLINE=1 reads the cache only. Download it once where there is a "
                f"network (`hf download {repo_id} --repo-type dataset`)"
                if constants.HF_HUB_OFFLINE else f": {err}")) from err
    except (HfHubHTTPError, OSError) as err:
        raise HubModelNotFound(f"dataset {where}: could not be fetched from the Hub: "
                               f"{err}") from err


def read_split(name: str, split: str, columns: HFColumns) -> Any | None:
    """One split of the dataset as a ``datasets.Dataset`` (None if it has no such split),
    its columns checked."""
    datasets = _datasets()
    loaded = datasets.load_dataset(str(dataset_folder(name, columns.revision)))
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
    channels = 1 if first.mode in ("1", "L", "I", "I;16", "F") else 3
    classes: tuple[int, ...] = ()
    if columns.label is not None:
        feature = train.features[columns.label]
        classes = (tuple(range(feature.num_classes)) if hasattr(feature, "num_classes")
                   else tuple(sorted(int(c) for c in train.unique(columns.label))))
    return channels, first.width, classes


def read_images(name: str, split: str, columns: HFColumns, image_size: int, channels: int,
                where: Mapping[str, Any] | None = None) -> LabeledImages | None:
    """The images of ``split`` (rows matching every ``column: value`` of ``where``, a list
    value meaning any of its items), scaled to [-1, 1] at ``image_size``; captioned if
    ``columns.caption`` is set. None if the dataset has no such split."""
    part = read_split(name, split, columns)
    if part is None:
        return None
    if where:
        unknown = [c for c in where if c not in part.column_names]
        if unknown:
            raise ValueError(f"forget_where names columns {unknown} that dataset {name!r} "
                             f"does not have (its columns: {part.column_names})")
        wanted = {c: set(v) if isinstance(v, (list, tuple)) else {v} for c, v in where.items()}
        part = part.filter(lambda row: all(row[c] in v for c, v in wanted.items()))
    mode = "L" if channels == 1 else "RGB"
    pixels = [np.asarray(image.convert(mode)) for image in part[columns.image]]
    sizes = {p.shape[:2] for p in pixels}
    if len(sizes) > 1:  # resize_and_scale takes one stack: bring every image to one size
        from PIL import Image

        pixels = [np.asarray(Image.fromarray(p).resize((image_size, image_size),
                                                       Image.Resampling.BICUBIC))
                  for p in pixels]
    stacked = (torch.from_numpy(np.stack(pixels)) if pixels
               else torch.zeros(0, image_size, image_size, dtype=torch.uint8))
    if stacked.dim() == 4:  # [N, H, W, C] -> [N, C, H, W]
        stacked = stacked.permute(0, 3, 1, 2)
    images = resize_and_scale(stacked, image_size, 255)
    labels = (torch.as_tensor(part[columns.label], dtype=torch.int64)
              if columns.label is not None else torch.full((len(part),), -1))
    if columns.caption is not None:
        return CaptionedImages(images, labels, [str(c) for c in part[columns.caption]])
    return LabeledImages(images, labels)
