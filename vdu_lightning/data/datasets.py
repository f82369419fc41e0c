"""In-memory labelled images, the stratified train/validation split, and pixel scaling.

Every loader in this package ends in ``resize_and_scale``, so all data sets agree on one
pixel convention: float32 in [-1, 1], the range the diffusion models are trained on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

#: Images resized per chunk, so resizing a 60k-image pool does not double its memory at once.
_RESIZE_CHUNK = 4096


def check_image_size(image_size: object, what: str = "image_size") -> int:
    """Return ``image_size`` if it is a positive int, else raise a ValueError naming it."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"{what} must be a positive int (e.g. 16, 28, 32), got {image_size!r}")
    return image_size


def resize_and_scale(images: Tensor, image_size: int, max_value: float) -> Tensor:
    """Scale pixel values from ``[0, max_value]`` to ``[-1, 1]`` and resize to a square.

    Args:
        images: ``[N, H, W]`` or ``[N, C, H, W]`` pixels, any integer or float dtype.
        image_size: side of the square output images.
        max_value: the value that maps to 1 (255 for bytes, 16 for sklearn's digits).

    Returns:
        float32 ``[N, C, image_size, image_size]``, clamped to [-1, 1] (antialiased bilinear
        resizing can overshoot slightly).

    Example:
        >>> resize_and_scale(torch.full((2, 8, 8), 255, dtype=torch.uint8), 4, 255).shape
        torch.Size([2, 1, 4, 4])
    """
    check_image_size(image_size)
    if max_value <= 0:
        raise ValueError(f"max_value must be positive (255 for bytes), got {max_value!r}")
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4:
        raise ValueError(
            f"images must have shape [N, H, W] or [N, C, H, W], got {tuple(images.shape)}"
        )
    scaled = images.to(torch.float32) * (2.0 / max_value) - 1.0
    if tuple(scaled.shape[-2:]) != (image_size, image_size):
        chunks = [
            F.interpolate(
                chunk,
                size=(image_size, image_size),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )
            for chunk in scaled.split(_RESIZE_CHUNK)
        ]
        scaled = torch.cat(chunks)
    return scaled.clamp_(-1.0, 1.0).contiguous()


class LabeledImages(Dataset):
    """Images and integer labels held in memory; items are ``{"image", "label"}`` dicts.

    Args:
        images: float ``[N, C, H, W]`` in [-1, 1].
        labels: integer ``[N]`` (−1 where the data have no labels).

    Example:
        >>> ds = LabeledImages(torch.zeros(4, 1, 8, 8), torch.tensor([0, 1, 0, 1]))
        >>> ds[0]["image"].shape, ds[0]["label"], ds.classes
        (torch.Size([1, 8, 8]), 0, [0, 1])
        >>> len(ds.subset([0, 2]))
        2
    """

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        if not isinstance(images, Tensor) or images.dim() != 4:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must be a [N, C, H, W] tensor, got {shape}")
        if not images.is_floating_point():
            raise ValueError(
                f"images must be a float tensor scaled to [-1, 1], got dtype {images.dtype} "
                "(use resize_and_scale to convert raw pixels)"
            )
        if not isinstance(labels, Tensor) or labels.dim() != 1:
            shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
            raise ValueError(f"labels must be a 1-D [N] tensor, got {shape}")
        if labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
        if len(images) != len(labels):
            raise ValueError(
                f"images and labels differ in length: {len(images)} images, {len(labels)} labels"
            )
        self.images: Tensor = images.to(torch.float32)
        self.labels: Tensor = labels.to(torch.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Tensor | int]:
        return {"image": self.images[index], "label": int(self.labels[index])}

    def subset(self, indices: Tensor | Sequence[int]) -> LabeledImages:
        """A new data set holding copies of the chosen items (the pool can then be freed)."""
        index = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        return LabeledImages(
            self.images.index_select(0, index).clone(), self.labels.index_select(0, index).clone()
        )

    @property
    def classes(self) -> list[int]:
        """The distinct labels present, sorted."""
        return [int(c) for c in torch.unique(self.labels)]


def stratified_split(labels: Tensor, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Split indices into train and validation parts with every class in both.

    Per class of ``n`` items, ``max(1, round(val_fraction * n))`` go to validation but never all
    of them, so a class with at least two items is present in both parts; a class with a single
    item stays in train (training parts are where forget sets are drawn from).

    Args:
        labels: integer ``[N]`` labels (one value, e.g. all −1, gives a plain random split).
        val_fraction: fraction of each class for validation, in (0, 1).
        seed: seed of the ``torch.Generator`` that permutes each class.

    Returns:
        ``(train_indices, val_indices)``, each sorted int64.

    Example:
        >>> train, val = stratified_split(torch.tensor([0, 0, 1, 1, 1, 1]), 0.25, seed=0)
        >>> len(train), len(val)
        (4, 2)
    """
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not (
        0.0 < val_fraction < 1.0
    ):
        raise ValueError(f"val_fraction must be in the open interval (0, 1), got {val_fraction!r}")
    labels = torch.as_tensor(labels).reshape(-1)
    generator = torch.Generator().manual_seed(int(seed))
    train_parts: list[Tensor] = []
    val_parts: list[Tensor] = []
    # Classes in sorted order and one generator: the split depends only on labels and seed.
    for cls in torch.unique(labels):
        members = torch.nonzero(labels == cls).flatten()
        count = len(members)
        permuted = members[torch.randperm(count, generator=generator)]
        n_val = min(max(1, round(val_fraction * count)), count - 1)
        val_parts.append(permuted[:n_val])
        train_parts.append(permuted[n_val:])
    empty = torch.empty(0, dtype=torch.int64)
    train = torch.sort(torch.cat(train_parts)).values if train_parts else empty
    val = torch.sort(torch.cat(val_parts)).values if val_parts else empty
    return train, val
