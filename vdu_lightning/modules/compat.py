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


#: Precisions that store the weights themselves in 16 bits (``module.to(dtype)``).
HALF_WEIGHT_PRECISIONS = ("16-true", "bf16-true")


def check_precision(trainer: Any, method: str) -> None:
    """Refuse precisions that keep the weights in 16 bits, before any work.

    Unlearning moves each weight by about lr a step (1e-5 in the mnist5k config), far below
    the spacing of 16-bit numbers near a weight of 0.1 (bfloat16: 5e-4, float16: 6e-5), so
    the steps would round away and the stability term would measure rounding. ``-mixed``
    keeps the weights and the prior in fp32.
    """
    precision = str(getattr(trainer, "precision", ""))
    if precision in HALF_WEIGHT_PRECISIONS:
        mixed = precision.replace("-true", "-mixed")
        raise ValueError(
            f"{method} does not run with precision={precision!r}: it stores the weights in "
            "16 bits, where unlearning steps round away and the prior's pull cannot be "
            f"represented. Use precision={mixed!r} (fp32 weights and prior, 16-bit compute)."
        )


def refuse_sharded_weights(trainer: Any, what: str) -> None:
    """Refuse ``what`` under ModelParallelStrategy (FSDP2), where no process holds the whole
    network: it needs full weights on one process (writing or sampling from rank 0)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    if isinstance(getattr(trainer, "strategy", None), ModelParallelStrategy):
        raise ValueError(
            f"{what} does not run under ModelParallelStrategy (FSDP2): the weights are sharded "
            "across the processes. Save one-file checkpoints (save_distributed_checkpoint: "
            "false), then export or evaluate in one process: VDUModule.load_from_checkpoint("
            "CKPT).save_pretrained(DIR), or vdu validate --ckpt_path CKPT (see "
            "docs/distributed.md)"
        )
