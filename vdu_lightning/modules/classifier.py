"""``ClassifierModule``: trains the evaluation classifier that scores generated samples.

It is trained on the full real data (never on generated images) with photometric
augmentation, and wraps a torch-only ``ClassifierNet`` (``vdu_lightning.evaluation``), which
is what the metrics and the evaluation use: its predictions count the forgotten class among
samples (PUL), and its penultimate layer gives the features for FID where Inception weights
are not available.
"""

from __future__ import annotations

import os

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from vdu_lightning.evaluation.classifier import ClassifierNet, load_classifier, save_classifier
from vdu_lightning.evaluation.photometric import augment, random_shift


class ClassifierModule(pl.LightningModule):
    """Trains a ``ClassifierNet`` (``self.net``) and exports it.

    Args:
        in_channels, num_classes, width, dropout, architecture, normalise: the
            ``ClassifierNet`` (``vgg`` or ``lenet``; ``normalise`` standardises each image).
        lr, weight_decay: AdamW, with a cosine decay over the run.
        max_shift: random translation (pixels) used as augmentation during training.
        augment: also random offset, contrast, noise and blur (``evaluation.photometric``),
            which makes the evaluator robust to a generator's photometric drift.

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
        architecture: str = "vgg",
        normalise: bool = True,
        lr: float = 2e-3,
        weight_decay: float = 1e-4,
        max_shift: int = 2,
        augment: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = ClassifierNet(in_channels, num_classes, width, dropout, architecture,
                                 normalise)
        self.train_accuracy = MulticlassAccuracy(num_classes, average="micro")
        self.val_accuracy = MulticlassAccuracy(num_classes, average="micro")

    @property
    def feature_dim(self) -> int:
        return self.net.feature_dim

    @property
    def in_channels(self) -> int:
        return self.net.in_channels

    @property
    def num_classes(self) -> int:
        return self.net.num_classes

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features ``[B, feature_dim]`` of images in [-1, 1]."""
        return self.net.features(images)

    @override
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    @override
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images = (augment(batch["image"], self.hparams.max_shift) if self.hparams.augment
                  else random_shift(batch["image"], self.hparams.max_shift))
        logits = self(images)
        loss = F.cross_entropy(logits, batch["label"])
        self.train_accuracy(logits, batch["label"])
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_accuracy, on_step=False, on_epoch=True)
        return loss

    @override
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch["image"])
        self.val_accuracy(logits, batch["label"])
        self.log("val/loss", F.cross_entropy(logits, batch["label"]), sync_dist=True)
        self.log("val/acc", self.val_accuracy, prog_bar=True)

    @override
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
        """Write the network's ``config.json`` and ``model.safetensors``, atomically; read it
        back with ``from_pretrained`` or, without Lightning, ``evaluation.load_classifier``."""
        save_classifier(self.net, path)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "ClassifierModule":
        """Load a directory written by ``save_pretrained`` (no pickle involved)."""
        net = load_classifier(path)
        module = cls(**net.config)
        module.net = net
        return module.eval()
