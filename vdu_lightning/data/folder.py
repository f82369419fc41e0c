"""A folder of images with optional captions and labels (the text-to-image forget sets).

Captions come from a ``metadata.jsonl`` at the folder's top (one JSON object per line with
``file_name`` and ``text`` or ``caption``, optionally ``label``: the layout of diffusers'
training scripts and of the Hugging Face ``imagefolder`` loader), or else from a ``.txt`` file
beside each image with the same stem. Images are decoded lazily: a folder of 512×512 photos
would not fit in memory as floats.
"""

from __future__ import annotations

import contextlib
import json
import posixpath
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from vdu_lightning.data.datasets import check_image_size, resize_and_scale

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
METADATA_FILE = "metadata.jsonl"
#: Pillow's modes of 16-bit grey PNGs ("I" in older Pillow). Pillow reduces 16-bit colour
#: PNGs to 8 bits itself, but converting these to "L" clips every value above 255.
_GREY_16_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")


def json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, value) of each non-blank line of a JSON Lines file; a line that is not
    JSON is refused naming the file and the line."""
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg})") from err


def _read_metadata(folder: Path) -> dict[str, dict]:
    """``file_name`` (relative to the folder, '/'-separated) → its metadata row."""
    rows: dict[str, dict] = {}
    path = folder / METADATA_FILE
    for number, row in json_lines(path):
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            raise ValueError(f"{path}, line {number}: each line needs a string 'file_name'")
        # "./a.png" and "a.png" name the same file: keys are normalised like the paths.
        name = posixpath.normpath(row["file_name"])
        if posixpath.isabs(name) or name == ".." or name.startswith("../"):
            raise ValueError(f"{path}, line {number}: file_name {row['file_name']!r} is outside "
                             f"{folder}: file names are paths relative to the folder, inside it "
                             "(e.g. 'images/0001.png')")
        rows[name] = row
    return rows


@contextlib.contextmanager
def _open_image(path: Path) -> Iterator[Image.Image]:
    """``Image.open(path)``, its errors (also while decoding in the block) naming the file."""
    try:
        with Image.open(path) as image:
            yield image
    except Image.DecompressionBombError as err:  # not an OSError
        raise ValueError(
            f"{path} is refused as a possible decompression bomb ({err}). Make it smaller, or, "
            "if you trust it, raise PIL.Image.MAX_IMAGE_PIXELS"
        ) from err
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{path} is not a readable image (corrupt or truncated): {err}") from err


def _caption_of(row: dict | None, image: Path) -> str:
    if row is not None:
        caption = row.get("text", row.get("caption", ""))
        return str(caption)
    beside = image.with_suffix(".txt")
    return beside.read_text(encoding="utf-8").strip() if beside.is_file() else ""


def _label_of(row: dict | None, root: Path) -> int:
    label = -1 if row is None else row.get("label", -1)
    if isinstance(label, bool) or not isinstance(label, int):
        raise ValueError(f"{root / METADATA_FILE}: the label of {row['file_name']!r} must be an "
                         f"integer, got {label!r}")
    return label


def image_tensor(image: Image.Image, side: int, channels: int) -> Tensor:
    """A decoded image as ``[channels, side, side]`` float32 in [-1, 1]: resized so that its
    short side is ``side``, centre-cropped; 16-bit grey read at its depth, not clipped."""
    deep = image.mode in _GREY_16_BIT_MODES
    image = image.convert("F" if deep else "RGB" if channels == 3 else "L")
    scale = side / min(image.size)
    width = max(side, round(image.width * scale))
    height = max(side, round(image.height * scale))
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32 if deep else np.uint8).copy())
    pixels = pixels.permute(2, 0, 1) if pixels.dim() == 3 else pixels.unsqueeze(0)
    # Grey as RGB is the grey value in every channel (what convert("RGB") does for "L").
    pixels = pixels.expand(channels, -1, -1)
    return resize_and_scale(pixels.unsqueeze(0), side, 65535.0 if deep else 255.0)[0]


class CaptionedImageFolder(Dataset):
    """Images under ``root`` (searched recursively), each with a caption and a label.

    Items are ``{"image": [C, S, S] in [-1, 1], "label": int (−1 if none), "caption": str}``.
    Each image is resized so that its shorter side is ``image_size`` and centre-cropped square.

    Args:
        root: the folder.
        image_size: side of the returned images; None takes the first image's shorter side.
        channels: 3 (RGB) or 1 (grey); every image is converted (16-bit grey PNGs from
            their full depth).

    Raises:
        FileNotFoundError: ``root`` is not a folder, or holds no image, or ``metadata.jsonl``
            names a file that is not there.
        ValueError: a malformed ``metadata.jsonl`` line (also a ``file_name`` outside the
            folder), or a bad argument.

    Example:
        >>> ds = CaptionedImageFolder("forget_set/", image_size=64)  # doctest: +SKIP
        >>> ds[0]["caption"]  # doctest: +SKIP
        'a painting in the style of ...'
    """

    def __init__(
        self, root: str | Path, image_size: int | None = None, channels: int = 3
    ) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}")
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root} is not a directory")
        metadata = _read_metadata(self.root) if (self.root / METADATA_FILE).is_file() else None
        if metadata is not None:
            missing = [name for name in metadata if not (self.root / name).is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{self.root / METADATA_FILE} names files that are not in {self.root}: "
                    f"{missing[:5]}"
                )
            files = [self.root / name for name in sorted(metadata)]
        else:
            files = sorted(
                p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
            )
        if not files:
            raise FileNotFoundError(
                f"no images in {self.root}: expected files ending in {', '.join(IMAGE_SUFFIXES)}"
            )
        rows = [
            metadata[p.relative_to(self.root).as_posix()] if metadata is not None else None
            for p in files
        ]
        self.files: list[Path] = files
        self.captions: list[str] = [_caption_of(row, p) for row, p in zip(rows, files)]
        self.labels: Tensor = torch.tensor(
            [_label_of(row, self.root) for row in rows], dtype=torch.int64
        )
        self.channels = channels
        if image_size is None:
            with _open_image(files[0]) as first:
                image_size = min(first.size)
        self.image_size = check_image_size(image_size)

    def __len__(self) -> int:
        return len(self.files)

    def check_images(self) -> None:
        """Open every image's header (not its pixels): a file Pillow cannot open, or refuses
        as a decompression bomb, is named now rather than when training reaches it."""
        for path in self.files:
            with _open_image(path):
                pass

    def load_image(self, index: int) -> Tensor:
        """The ``index``-th image as ``[C, S, S]`` float32 in [-1, 1]."""
        with _open_image(self.files[index]) as opened:
            return image_tensor(opened, self.image_size, self.channels)

    def __getitem__(self, index: int) -> dict[str, Tensor | int | str]:
        return {
            "image": self.load_image(index),
            "label": int(self.labels[index]),
            "caption": self.captions[index],
        }

    def subset(self, indices: Tensor | Sequence[int]) -> CaptionedImageFolder:
        """A view on the chosen items (images stay on disk)."""
        index = torch.as_tensor(indices, dtype=torch.int64).reshape(-1).tolist()
        view = object.__new__(CaptionedImageFolder)
        view.root, view.channels, view.image_size = self.root, self.channels, self.image_size
        view.files = [self.files[i] for i in index]
        view.captions = [self.captions[i] for i in index]
        view.labels = self.labels[index].clone()
        return view

    @property
    def classes(self) -> list[int]:
        """The distinct labels present, sorted (``[-1]`` when the folder has no labels)."""
        return [int(c) for c in torch.unique(self.labels)]
