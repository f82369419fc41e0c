"""DiffusionModule inside a real Trainer: data/model shape checks and resumed noise streams."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from vdu_lightning import DiffusionModule, ImageDataModule
from vdu_lightning.modules.compat import check_data_fits_model


def tiny_trainer(max_steps: int, **kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", max_steps=max_steps, limit_val_batches=0, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, **kwargs)


def test_images_of_another_size_are_refused_before_training(tiny_unet_config: dict) -> None:
    module = DiffusionModule(unet=tiny_unet_config)  # 8x8, one channel
    before = [p.clone() for p in module.unet.parameters()]
    data = ImageDataModule(dataset="digits", image_size=16, batch_size=8)
    with pytest.raises(ValueError, match=r"16x16 images but the UNet takes 8x8"):
        tiny_trainer(2).fit(module, datamodule=data)
    assert all(torch.equal(a, b) for a, b in zip(before, module.unet.parameters()))


def test_channel_mismatch_is_named() -> None:
    rgb = ImageDataModule(dataset="cifar10", root="unused", image_size=8)
    with pytest.raises(ValueError, match=r"dataset='cifar10'.*3 channels but the UNet takes 1"):
        check_data_fits_model(rgb, (1, 8, 8), "the UNet")
    check_data_fits_model(rgb, (3, 8, 8), "the UNet")  # fits: no error


class RecordNoiseState(pl.Callback):
    def on_train_start(self, trainer: pl.Trainer, pl_module: DiffusionModule) -> None:
        self.state = pl_module.noise_generator.get_state().clone()


def test_resumed_fit_continues_the_noise_stream(tmp_path: Path, tiny_unet_config: dict) -> None:
    data = ImageDataModule(dataset="digits", batch_size=8)
    pl.seed_everything(0)
    first = DiffusionModule(unet=tiny_unet_config)
    trainer = tiny_trainer(2)
    trainer.fit(first, datamodule=data)
    saved_state = first.noise_generator.get_state().clone()
    trainer.save_checkpoint(tmp_path / "step2.ckpt")

    resumed, fresh = RecordNoiseState(), RecordNoiseState()
    tiny_trainer(3, callbacks=[resumed]).fit(
        DiffusionModule(unet=tiny_unet_config), datamodule=data, ckpt_path=tmp_path / "step2.ckpt"
    )
    tiny_trainer(3, callbacks=[fresh]).fit(DiffusionModule(unet=tiny_unet_config), datamodule=data)
    assert torch.equal(resumed.state, saved_state)
    assert not torch.equal(fresh.state, saved_state)
