"""Checks that the data a Trainer feeds a module have the shape its model expects."""

from __future__ import annotations

from typing import Any


def check_data_fits_model(datamodule: Any, shape: tuple[int, int, int], model: str) -> None:
    """Raise before training when the datamodule's images do not fit ``shape`` = (C, H, W).

    Datamodules that do not say their channels or size (any non-project datamodule) pass.
    """
    channels = getattr(datamodule, "channels", None)
    size = getattr(datamodule, "resolved_image_size", None)
    problems = []
    if channels is not None and channels != shape[0]:
        problems.append(f"{channels} channels but {model} takes {shape[0]}")
    if size is not None and (size, size) != tuple(shape[1:]):
        problems.append(f"{size}x{size} images but {model} takes {shape[1]}x{shape[2]}")
    if problems:
        name = getattr(datamodule, "hparams", {}).get("dataset")
        raise ValueError(
            f"the data (dataset={name!r}) do not fit the model: " + "; ".join(problems)
            + ". Set data.image_size, or build the model for these images."
        )
