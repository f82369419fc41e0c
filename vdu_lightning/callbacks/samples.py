"""``SampleGridLogger``: fixed-seed sample grids, to disk and to the experiment logger."""

from __future__ import annotations

import math
import os
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from torchvision.utils import make_grid, save_image
from typing_extensions import override

from vdu_lightning.files import atomic_file


def image_grid(images: torch.Tensor, nrow: int | None = None) -> torch.Tensor:
    """A ``[C, H, W]`` grid in [0, 1] of images in [-1, 1] (square by default)."""
    nrow = nrow or math.ceil(math.sqrt(images.shape[0]))
    return make_grid((images.float().cpu() + 1) / 2, nrow=nrow, padding=2, pad_value=1.0)


def save_grid(grid: torch.Tensor, path: str | os.PathLike) -> None:
    """Save a grid as PNG atomically."""
    with atomic_file(path) as tmp:
        save_image(grid, tmp, format="png")


class SampleGridLogger(pl.Callback):
    """Every ``every_n_steps`` training steps and at the end of fit, draw a fixed-seed grid.

    The module must have ``sample(num_images, seed=...)`` returning images in [-1, 1]. Grids go
    to ``<dirpath>/step_XXXXXXX.png`` (default ``<trainer.log_dir>/samples``) and to the
    logger: ``log_image`` for W&B, ``add_image`` for TensorBoard; any other logger gets the
    files only. Only global rank 0 samples.

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: vdu_lightning.callbacks.SampleGridLogger
              init_args: {every_n_steps: 500, num_images: 64}
    """

    def __init__(
        self,
        every_n_steps: int = 500,
        num_images: int = 64,
        seed: int = 0,
        dirpath: str | None = None,
        key: str = "samples",
    ) -> None:
        if every_n_steps < 1 or num_images < 1:
            raise ValueError(f"every_n_steps and num_images must be at least 1, got "
                             f"{every_n_steps} and {num_images}")
        self.every_n_steps = every_n_steps
        self.num_images = num_images
        self.seed = seed
        self.dirpath = dirpath
        self.key = key
        self._last_logged_step = -1

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not callable(getattr(pl_module, "sample", None)):
            raise TypeError(f"SampleGridLogger needs a module with a sample() method; "
                            f"{type(pl_module).__name__} has none")
        if self.dirpath is not None:
            return
        if isinstance(trainer.logger, WandbLogger):
            # W&B has no versioned log_dir: one folder per run id keeps runs apart. Only
            # rank 0 writes grids, and only rank 0 has the run.
            if trainer.is_global_zero:
                self.dirpath = os.path.join(trainer.logger.save_dir or trainer.default_root_dir,
                                            "samples", str(trainer.logger.version))
        else:
            # trainer.log_dir is a collective: resolve it here, on every rank.
            self.dirpath = os.path.join(trainer.log_dir or trainer.default_root_dir, "samples")

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: object, batch: object, batch_idx: int) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and step != self._last_logged_step:
            self.log_grid(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step != self._last_logged_step:
            self.log_grid(trainer, pl_module)

    def log_grid(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        self._last_logged_step = step
        if not trainer.is_global_zero:
            return
        grid = image_grid(pl_module.sample(self.num_images, seed=self.seed))
        path = Path(self.dirpath) / f"step_{step:07d}.png"
        save_grid(grid, path)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                # The PNG, not the tensor: wandb reads float tensors as 0..255, and a grid in
                # [0, 1] would show black.
                logger.log_image(key=self.key, images=[str(path)], step=step,
                                 caption=[f"step {step}, seed {self.seed}"])
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(self.key, grid, global_step=step)
