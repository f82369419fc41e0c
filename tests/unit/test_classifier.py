"""ClassifierModule: features, augmentation, training, export."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from vdu_lightning import ClassifierModule, ImageDataModule
from vdu_lightning.modules.classifier import random_shift


def test_features_are_the_penultimate_layer() -> None:
    clf = ClassifierModule(in_channels=1, num_classes=10, width=8).eval()
    images = torch.rand(5, 1, 16, 16) * 2 - 1
    features = clf.features(images)
    assert features.shape == (5, clf.feature_dim) == (5, 32)
    torch.testing.assert_close(clf(images), clf.net.head(features))
    # Any image size works (global pooling before the head).
    assert clf.features(torch.zeros(2, 1, 28, 28)).shape == (2, 32)


def test_random_shift_translates_without_distorting() -> None:
    images = -torch.ones(64, 1, 9, 9)
    images[:, :, 4, 4] = 1.0
    shifted = random_shift(images, max_shift=2)
    bright = (shifted == 1.0).nonzero()
    assert bright.shape[0] == 64  # exactly one bright pixel survives in each image
    assert (bright[:, 2] - 4).abs().max() <= 2 and (bright[:, 3] - 4).abs().max() <= 2
    assert len({(r.item(), c.item()) for r, c in bright[:, 2:]}) > 5  # shifts vary
    torch.testing.assert_close(random_shift(images, 0), images)


def test_short_training_learns_the_digits(tmp_path) -> None:
    pl.seed_everything(0)
    clf = ClassifierModule(in_channels=1, num_classes=10, width=16, lr=3e-3)
    data = ImageDataModule(dataset="digits", batch_size=64)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=6, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         default_root_dir=tmp_path)
    trainer.fit(clf, datamodule=data)
    assert trainer.callback_metrics["val/acc"] > 0.85


def test_save_and_load_give_identical_predictions(tmp_path) -> None:
    clf = ClassifierModule(in_channels=1, num_classes=10, width=8).eval()
    with torch.no_grad():
        for p in clf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    clf.save_pretrained(tmp_path / "clf")
    loaded = ClassifierModule.from_pretrained(tmp_path / "clf")
    images = torch.randn(4, 1, 16, 16)
    torch.testing.assert_close(loaded(images), clf(images), atol=0, rtol=0)
    (tmp_path / "clf" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        ClassifierModule.from_pretrained(tmp_path / "clf")
