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
    """The noise generator's state when the first training batch starts."""

    state = None

    def on_train_batch_start(self, trainer, pl_module: DiffusionModule, batch, index) -> None:
        if self.state is None:
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
        DiffusionModule(unet=tiny_unet_config), datamodule=data, ckpt_path=tmp_path / "step2.ckpt",
        weights_only=True,
    )
    tiny_trainer(3, callbacks=[fresh]).fit(DiffusionModule(unet=tiny_unet_config), datamodule=data)
    assert torch.equal(resumed.state, saved_state)
    assert not torch.equal(fresh.state, saved_state)


class CountingEMA(DiffusionModule):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.ema_updates = 0

    def update_ema(self) -> None:
        self.ema_updates += 1
        super().update_ema()


def test_ema_follows_every_optimizer_step_under_accumulation(tiny_unet_config: dict) -> None:
    # 3 batches, accumulating 2: Lightning steps after batch 2 and after the last batch.
    module = CountingEMA(unet=tiny_unet_config)
    trainer = tiny_trainer(-1, max_epochs=1, limit_train_batches=3, accumulate_grad_batches=2)
    trainer.fit(module, datamodule=ImageDataModule(dataset="digits", batch_size=8))
    assert trainer.global_step == 2
    assert module.ema_updates == 2


def test_noise_streams_of_another_world_size_are_restarted(tmp_path: Path,
                                                           tiny_unet_config: dict) -> None:
    from vdu_lightning.files import load_checkpoint
    from vdu_lightning.seeding import rank_generator

    data = ImageDataModule(dataset="digits", batch_size=8)
    trainer = tiny_trainer(2)
    trainer.fit(DiffusionModule(unet=tiny_unet_config), datamodule=data)
    trainer.save_checkpoint(tmp_path / "one.ckpt")
    checkpoint = load_checkpoint(tmp_path / "one.ckpt")
    assert checkpoint["noise_generator_states"].shape[0] == 1  # one row per process
    # As if two processes had written it: this single process cannot continue rank 1's stream.
    checkpoint["noise_generator_states"] = checkpoint["noise_generator_states"].repeat(2, 1)
    torch.save(checkpoint, tmp_path / "two.ckpt")
    recorder = RecordNoiseState()
    with pytest.warns(UserWarning, match="saved by 2 processes"):
        tiny_trainer(3, callbacks=[recorder]).fit(
            DiffusionModule(unet=tiny_unet_config), datamodule=data,
            ckpt_path=tmp_path / "two.ckpt", weights_only=True)
    expected = rank_generator("cpu", 0, offset=2).get_state()
    assert torch.equal(recorder.state, expected)
