"""A disk cache of what the original model gives an evaluation: its samples and its likelihood
of the held-out images never change, and sampling them is most of an evaluation's time.

An entry is keyed by a digest of the original network's weights and of every setting that
shapes the result, so a changed model or setting never reads a stale entry. Entries hold
plain tensors, saved atomically and read back with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vdu_lightning.files import atomic_file


def _raw_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def state_digest(module: nn.Module) -> str:
    """A digest of a network's parameters and buffers (names, shapes, dtypes and values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(_raw_bytes(tensor))
    return digest.hexdigest()


def tensor_digest(tensor: torch.Tensor) -> str:
    """A digest of one tensor's shape, dtype and values (e.g. the held-out images)."""
    digest = hashlib.sha256(f"{tuple(tensor.shape)}:{tensor.dtype}".encode())
    digest.update(_raw_bytes(tensor))
    return digest.hexdigest()


class OriginalCache:
    """Entries ``<directory>/original-<key>.pt``.

    Example:
        >>> cache = OriginalCache("cache")  # doctest: +SKIP
        >>> key = cache.key(model_digest="ab12", num_samples=500)  # doctest: +SKIP
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)

    @staticmethod
    def key(**settings: Any) -> str:
        text = json.dumps(settings, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def path(self, key: str) -> Path:
        return self.directory / f"original-{key}.pt"

    def load(self, key: str) -> dict[str, Any] | None:
        """The entry, or None when there is none or it cannot be read (it is recomputed)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a truncated or foreign file: recompute, and overwrite it
            return None

    def store(self, key: str, entry: dict[str, Any]) -> None:
        """Write an entry atomically (a reader never sees half of one)."""
        with atomic_file(self.path(key)) as tmp:
            torch.save(entry, tmp)
