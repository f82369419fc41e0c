"""VDUModule on a tiny real UNet: what moves, what is logged, checkpoints, guard, export."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from diffusers import DDPMPipeline
from lightning.pytorch.callbacks import ModelCheckpoint

from vdu_lightning import DiffusionModule, ForgetSetDataModule, ParameterPrior, VDUModule
from vdu_lightning.callbacks import (
    CheckpointPrior,
    ExportPretrained,
    NonFiniteLossError,
    UnlearningGuard,
)
from vdu_lightning.diffusion import seeded_noise
from vdu_lightning.files import load_checkpoint
from vdu_lightning.losses import denoising_error

UP_BLOCKS = ["up_blocks.*"]


def make_prior(unet: torch.nn.Module, include=None, spread: float = 1e-2) -> ParameterPrior:
    generator = torch.Generator().manual_seed(1)
    snapshots = [{n: p.detach() + spread * torch.randn(p.shape, generator=generator)
                  for n, p in unet.named_parameters()} for _ in range(3)]
    return ParameterPrior.from_tensors(snapshots, "independent", include=include)


def forget_data(**kwargs) -> ForgetSetDataModule:
    kwargs = {"dataset": "digits", "forget_classes": [3], "forget_size": 48, "eval_size": 32,
              "batch_size": 16, **kwargs}
    return ForgetSetDataModule(**kwargs)


def trainer(tmp_path: Path, max_steps: int = 4, **kwargs) -> pl.Trainer:
    kwargs = {"accelerator": "cpu", "max_steps": max_steps, "logger": False,
              "enable_checkpointing": False, "enable_progress_bar": False,
              "enable_model_summary": False, "limit_val_batches": 1,
              "num_sanity_val_steps": 0, "default_root_dir": tmp_path, **kwargs}
    return pl.Trainer(**kwargs)


def forget_error(module: VDUModule, images: torch.Tensor) -> float:
    generator = torch.Generator().manual_seed(0)
    t = torch.randint(0, 100, (images.shape[0],), generator=generator)
    noise = torch.randn(images.shape, generator=generator)
    with torch.no_grad():
        predicted = module.unet(module.scheduler.add_noise(images, noise, t), t).sample
    return float(denoising_error(predicted, noise))


def test_unlearning_raises_the_forget_error_and_moves_only_what_the_prior_covers(
    tmp_path: Path, pretrained: Path
) -> None:
    module = VDUModule(str(pretrained), gamma=0.5, lr=1e-3)
    before = {n: p.detach().clone() for n, p in module.unet.named_parameters()}
    module.set_prior(make_prior(module.unet, include=UP_BLOCKS))
    data = forget_data()
    data.setup("fit")
    images = torch.stack([data.forget_set[i]["image"] for i in range(32)])
    error_before = forget_error(module, images)
    fit = trainer(tmp_path, max_steps=6, val_check_interval=3)
    fit.fit(module, datamodule=data)

    assert forget_error(module, images) > error_before
    for name, parameter in module.unet.named_parameters():
        moved = not torch.equal(parameter.detach(), before[name])
        assert moved == name.startswith("up_blocks."), name
    metrics = fit.callback_metrics
    for key in ("train/stability", "train/plasticity", "train/loss", "val/forget_loss",
                "val/retain_loss"):
        assert torch.isfinite(metrics[key]), key
    combined = 0.5 * metrics["train/stability"] + 0.5 * metrics["train/plasticity"]
    assert torch.isclose(metrics["train/loss"], combined, rtol=1e-5)
    assert metrics["train/plasticity"] < 0  # minus an error


def test_the_stability_term_stays_fp32_under_bf16_mixed(tmp_path: Path, pretrained: Path
                                                        ) -> None:
    class CheckStability(pl.Callback):
        checked = 0

        def on_before_backward(self, trainer, pl_module, loss) -> None:
            stability = pl_module.loss_terms["stability"]
            prior = pl_module.prior
            reference = sum(
                ((p.detach().double() - prior.mean[n].double()) ** 2
                 / prior.var[n].double()).sum() / 2
                for n, p in pl_module.unet.named_parameters()
            ) / prior.numel
            assert stability.dtype == torch.float32
            assert torch.isclose(stability.double(), reference, rtol=1e-5), (stability, reference)
            assert pl_module.loss_terms["plasticity"].dtype == torch.float32
            type(self).checked += 1

    module = VDUModule(str(pretrained), gamma=0.5, lr=1e-3)
    module.set_prior(make_prior(module.unet, spread=1e-3))
    fit = trainer(tmp_path, max_steps=2, precision="bf16-mixed", callbacks=[CheckStability()],
                  limit_val_batches=0)
    fit.fit(module, datamodule=forget_data())
    assert CheckStability.checked == 2
    assert all(p.dtype == torch.float32 for p in module.unet.parameters())


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_sixteen_bit_weights_are_refused_before_the_prior_is_built(
        tmp_path: Path, pretrained: Path, precision: str) -> None:
    # The prior file does not exist: building it first would raise FileNotFoundError.
    callback = CheckpointPrior(prior=str(tmp_path / "not_built_yet.safetensors"))
    fit = trainer(tmp_path, max_steps=2, precision=precision, callbacks=[callback])
    mixed = precision.replace("-true", "-mixed")
    with pytest.raises(ValueError, match=rf"VDUModule does not run with precision='{precision}'"
                                         rf".*Use precision='{mixed}'"):
        fit.fit(VDUModule(str(pretrained)), datamodule=forget_data())
    assert fit.global_step == 0


def test_a_prior_of_another_model_is_refused_before_training(
    tmp_path: Path, pretrained: Path, tiny_unet_config: dict
) -> None:
    other = DiffusionModule(unet={**tiny_unet_config, "block_out_channels": [8, 16]})
    make_prior(other.unet).save(tmp_path / "other.safetensors")
    module = VDUModule(str(pretrained))
    fit = trainer(tmp_path, callbacks=[CheckpointPrior(prior=str(tmp_path / "other.safetensors"))])
    with pytest.raises(ValueError, match=r"does not match the model being unlearned.*"
                                         r"conv_in\.weight: prior \(8, 1, 3, 3\)"):
        fit.fit(module, datamodule=forget_data())
    assert fit.global_step == 0


def test_without_a_prior_fit_says_what_to_add(tmp_path: Path, pretrained: Path) -> None:
    with pytest.raises(RuntimeError, match="CheckpointPrior"):
        trainer(tmp_path).fit(VDUModule(str(pretrained)), datamodule=forget_data())


@pytest.mark.parametrize("gamma", [0.0, 1.0, -0.1, 1.5])
def test_gamma_outside_the_open_unit_interval_is_refused(pretrained: Path, gamma: float
                                                         ) -> None:
    with pytest.raises(ValueError, match="gamma must be in \\(0, 1\\)"):
        VDUModule(str(pretrained), gamma=gamma)


def test_checkpoints_carry_the_prior_and_a_resume_does_not_rebuild_it(
    tmp_path: Path, pretrained: Path
) -> None:
    module = VDUModule(str(pretrained), lr=1e-3)
    prior = make_prior(module.unet, include=UP_BLOCKS)
    prior.save(tmp_path / "prior.safetensors")
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True,
                                  every_n_train_steps=2)
    fit = trainer(tmp_path, max_steps=2, enable_checkpointing=True, limit_val_batches=0,
                  callbacks=[CheckpointPrior(prior=str(tmp_path / "prior.safetensors")),
                             checkpoints])
    fit.fit(module, datamodule=forget_data())
    saved = load_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert saved["vdu_prior"]["metadata"]["names"] == prior.names

    # The prior file is gone: a CheckpointPrior that tried to read it would fail.
    (tmp_path / "prior.safetensors").unlink()
    resumed = VDUModule(str(pretrained), lr=1e-3)
    fit = trainer(tmp_path, max_steps=4, limit_val_batches=0,
                  callbacks=[CheckpointPrior(prior=str(tmp_path / "prior.safetensors"))])
    fit.ckpt_path = tmp_path / "ckpt" / "last.ckpt"  # known before setup: see CheckpointPrior
    fit.fit(resumed, datamodule=forget_data(), weights_only=True)
    assert fit.global_step == 4
    assert resumed.prior.names == prior.names
    for name in prior.names:
        assert torch.equal(resumed.prior.var[name], prior.var[name])
    assert not resumed.unet.conv_in.weight.requires_grad  # outside the prior: still frozen


class NaNAtStep(VDUModule):
    """Plasticity turns NaN at a given step, as a diverging run would."""

    def __init__(self, *args, nan_step: int = 3, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.nan_step = nan_step

    def plasticity_loss(self, batch):
        loss = super().plasticity_loss(batch)
        return loss * float("nan") if self.global_step == self.nan_step else loss


def test_the_guard_stops_on_nan_naming_step_and_term_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, pretrained: Path
) -> None:
    module = NaNAtStep(str(pretrained), lr=1e-3, nan_step=3)
    module.set_prior(make_prior(module.unet))
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True,
                                  every_n_train_steps=1)
    fit = trainer(tmp_path, max_steps=10, enable_checkpointing=True, limit_val_batches=0,
                  callbacks=[UnlearningGuard(), checkpoints])
    with pytest.raises(NonFiniteLossError, match=r"step 3: plasticity = nan"):
        fit.fit(module, datamodule=forget_data())
    last = load_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert last["global_step"] == 3
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values())
    assert all(torch.isfinite(p).all() for p in module.unet.parameters())


def test_a_reached_target_forget_loss_stops_fit(tmp_path: Path, pretrained: Path) -> None:
    module = VDUModule(str(pretrained), target_forget_loss=0.0)
    module.set_prior(make_prior(module.unet))
    fit = trainer(tmp_path, max_steps=20, val_check_interval=2, check_val_every_n_epoch=None)
    fit.fit(module, datamodule=forget_data())
    assert fit.global_step == 2


def test_it_starts_from_a_diffusion_checkpoint_ema_or_raw_also_without_stored_configs(
    tmp_path: Path, tiny_unet_config: dict
) -> None:
    module = DiffusionModule(unet=tiny_unet_config, num_train_timesteps=100)
    fit = trainer(tmp_path, max_steps=2, enable_checkpointing=True, limit_val_batches=0,
                  callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)])
    fit.fit(module, datamodule=forget_data())
    path = tmp_path / "ckpt" / "last.ckpt"
    old_style = load_checkpoint(path)
    for key in ("unet_config", "scheduler_config"):
        old_style.pop(key)
    torch.save(old_style, tmp_path / "old.ckpt")
    for source in (path, tmp_path / "old.ckpt"):
        for weights, unet in (("ema", module.ema_unet), ("raw", module.unet)):
            vdu = VDUModule(str(source), weights=weights)
            for (name, a), b in zip(vdu.unet.state_dict().items(), unet.state_dict().values()):
                assert torch.equal(a, b), (source, weights, name)
        assert vdu.scheduler.config.num_train_timesteps == 100


def test_export_loads_in_diffusers_and_sampling_pairs_original_and_unlearned(
    tmp_path: Path, pretrained: Path
) -> None:
    module = VDUModule(str(pretrained), lr=1e-2)
    module.set_prior(make_prior(module.unet))
    fit = trainer(tmp_path, max_steps=2, limit_val_batches=0,
                  callbacks=[ExportPretrained(str(tmp_path / "unlearned"))])
    fit.fit(module, datamodule=forget_data())
    pipeline = DDPMPipeline.from_pretrained(tmp_path / "unlearned", local_files_only=True)
    for a, b in zip(pipeline.unet.parameters(), module.unet.parameters()):
        assert torch.equal(a, b)

    noise = seeded_noise(3, module.sample_shape, seed=4)
    original = DiffusionModule.from_pretrained(pretrained, sample_steps=2)
    expected = original.sample(3, seed=4, use_ema=True)
    assert torch.allclose(module.sample_from(noise, original=True, num_steps=2), expected)
    assert not torch.allclose(module.sample_from(noise, num_steps=2), expected)
    assert torch.equal(module.sample(3, seed=4, num_steps=2),
                       module.sample_from(noise, num_steps=2))
