"""``ClassifierModule``: the evaluation classifier that scores generated samples.

It is trained on the full real data (never on generated images). Its predictions count the
forgotten class among samples (PUL), and its penultimate layer gives the features for FID
where Inception weights are not available.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from vdu_lightning.files import atomic_directory

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def random_shift(images: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (padding with the background, −1)."""
    if max_shift == 0:
        return images
    batch, _, height, width = images.shape
    padded = F.pad(images, [max_shift] * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, batch), device=images.device)
    rows = (dy[:, None] + torch.arange(height, device=images.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(width, device=images.device))[:, None, None, :]
    index = torch.arange(batch, device=images.device)[:, None, None, None]
    channel = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return padded[index, channel, rows, cols]


class ClassifierModule(pl.LightningModule):
    """A small CNN classifier with a ``features`` method (its penultimate layer).

    Works at any image size (global average pooling before the head).

    Args:
        in_channels: image channels.
        num_classes: number of classes.
        width: channels of the first stage (doubled twice).
        dropout: dropout before the linear head.
        lr, weight_decay: AdamW, with a cosine decay over the run.
        max_shift: random translation (pixels) used as augmentation during training.

    Example:
        >>> clf = ClassifierModule(in_channels=1, num_classes=10)
        >>> clf.features(torch.zeros(2, 1, 16, 16)).shape
        torch.Size([2, 128])
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 32,
        dropout: float = 0.25,
        lr: float = 2e-3,
        weight_decay: float = 1e-4,
        max_shift: int = 2,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        self.save_hyperparameters()
        self.body = nn.Sequential(
            _conv_block(in_channels, width),
            _conv_block(width, width),
            nn.MaxPool2d(2),
            _conv_block(width, 2 * width),
            _conv_block(2 * width, 2 * width),
            nn.MaxPool2d(2),
            _conv_block(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(4 * width, num_classes))
        self.train_accuracy = MulticlassAccuracy(num_classes, average="micro")
        self.val_accuracy = MulticlassAccuracy(num_classes, average="micro")

    @property
    def feature_dim(self) -> int:
        return 4 * self.hparams.width

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features ``[B, feature_dim]`` of images in [-1, 1]."""
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    @torch.no_grad()
    def predict_labels(self, images: torch.Tensor) -> torch.Tensor:
        """The predicted class of each image (in eval mode, whatever the module's mode)."""
        was_training = self.training
        self.eval()
        labels = self(images.to(self.device)).argmax(dim=1)
        self.train(was_training)
        return labels

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images = random_shift(batch["image"], self.hparams.max_shift)
        logits = self(images)
        loss = F.cross_entropy(logits, batch["label"])
        self.train_accuracy(logits, batch["label"])
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_accuracy, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch["image"])
        self.val_accuracy(logits, batch["label"])
        self.log("val/loss", F.cross_entropy(logits, batch["label"]), sync_dist=True)
        self.log("val/acc", self.val_accuracy, prog_bar=True)

    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.AdamW(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
        estimated = self.trainer.estimated_stepping_batches
        if estimated == float("inf"):
            raise ValueError("the cosine learning-rate schedule needs a finite run: set "
                             "trainer.max_epochs or trainer.max_steps")
        steps = max(1, int(estimated))
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler,
                                                         "interval": "step"}}

    # ---- export -------------------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write ``config.json`` and ``model.safetensors`` into a directory, atomically."""
        # Only the constructor's arguments: LightningCLI adds private keys to hparams.
        arguments = inspect.signature(type(self).__init__).parameters
        config = {k: v for k, v in self.hparams.items() if k in arguments}
        with atomic_directory(path) as tmp:
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2))
            state = {k: v.contiguous() for k, v in self.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "ClassifierModule":
        """Load a directory written by ``save_pretrained`` (no pickle involved)."""
        path = Path(path)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (path / name).is_file():
                raise FileNotFoundError(
                    f"{path} is not a classifier directory: {name} is missing "
                    f"(expected {CONFIG_NAME} and {WEIGHTS_NAME}, as written by save_pretrained)"
                )
        module = cls(**json.loads((path / CONFIG_NAME).read_text()))
        module.load_state_dict(load_file(str(path / WEIGHTS_NAME)))
        return module.eval()
