"""Stable-Diffusion pipeline directories: checked, loaded from local files, written atomically.

The SD 1.x/2.x layout: ``model_index.json`` and the sub-folders ``unet``, ``vae``,
``text_encoder``, ``tokenizer`` and ``scheduler`` (``safety_checker`` and
``feature_extractor`` are optional and never loaded here). A Hub ID is first resolved to its
snapshot in the Hugging Face cache (``vdu_lightning.hub``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffusers import StableDiffusionPipeline

from vdu_lightning.files import atomic_directory
from vdu_lightning.hub import resolve_model

if TYPE_CHECKING:
    from vdu_lightning.model_card import ExportCard

#: The sub-folders a text-to-image pipeline directory must have.
REQUIRED_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def check_pipeline_dir(path: str | os.PathLike) -> Path:
    """The local directory of ``path`` (a directory or a Hub ID, see ``vdu_lightning.hub``)
    if it holds a Stable-Diffusion pipeline; else an error naming what is missing.

    Raises:
        FileNotFoundError: the directory, its ``model_index.json`` or a sub-folder is missing.
    """
    path = resolve_model(path)
    if not path.is_dir():
        raise FileNotFoundError(f"pipeline directory not found: {path}")
    missing = [part for part in REQUIRED_PARTS if not (path / part).is_dir()]
    if not (path / "model_index.json").is_file():
        missing.insert(0, "model_index.json")
    if missing:
        raise FileNotFoundError(
            f"{path} is not a Stable Diffusion pipeline directory: it lacks {missing} (expected "
            f"model_index.json and the sub-folders {list(REQUIRED_PARTS)}, as written by "
            "StableDiffusionPipeline.save_pretrained)"
        )
    return path


def load_pipeline(path: str | os.PathLike, **components: Any) -> StableDiffusionPipeline:
    """The pipeline in ``path``, from local files only, without a safety checker;
    ``components`` (e.g. ``unet=...``) replace the directory's and are not read."""
    return StableDiffusionPipeline.from_pretrained(
        check_pipeline_dir(path), local_files_only=True, safety_checker=None,
        requires_safety_checker=False, **components,
    )


def save_pipeline(pipeline: StableDiffusionPipeline, path: str | os.PathLike,
                  card: ExportCard | None = None) -> None:
    """Write ``pipeline`` (and ``card``'s README.md) to ``path`` atomically (an earlier
    directory there stays whole until the new one is complete)."""
    with atomic_directory(path) as tmp:
        pipeline.save_pretrained(tmp, safe_serialization=True)
        if card is not None:
            card.write(tmp)
