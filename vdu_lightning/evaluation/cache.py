"""A disk cache of what the original model gives an evaluation: its samples and its likelihood
of the held-out images never change, and sampling them is most of an evaluation's time.

An entry is keyed (``original_key``) by a digest of the original network's weights, of its
scheduler, of the held-out images and labels, and of every setting that shapes the result,
with a version that changes whenever the way the results are computed does: a changed model,
setting or code never reads a stale entry. Entries hold plain tensors, saved atomically and
read back with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vdu_lightning.evaluation.likelihood import Likelihood
from vdu_lightning.files import atomic_file

#: Raise when the samples or the bound are computed differently (entries of another version
#: are never read).
CACHE_VERSION = 2


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


def original_key(unet: nn.Module, scheduler_config: Any, **settings: Any) -> str:
    """The key of an original model's entry: its weights, its scheduler and ``settings``
    (numbers, strings, lists; tensors such as the held-out images enter by digest)."""
    plain = {name: tensor_digest(value) if isinstance(value, torch.Tensor) else value
             for name, value in settings.items()}
    return OriginalCache.key(version=CACHE_VERSION, model=state_digest(unet),
                             scheduler=dict(scheduler_config), **plain)


def to_entry(samples: torch.Tensor, likelihood: dict[str, Likelihood] | None
             ) -> dict[str, Any]:
    """An entry of plain tensors: the samples and each part's bound."""
    return {"samples": samples,
            "likelihood": {part: vars(values) for part, values in (likelihood or {}).items()}}


def from_entry(entry: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Likelihood] | None]:
    """(samples, likelihood per part or None) of an entry."""
    likelihood = {part: Likelihood(**values) for part, values in entry["likelihood"].items()}
    return entry["samples"], likelihood or None


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
