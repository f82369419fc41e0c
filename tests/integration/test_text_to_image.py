"""Feature unlearning on a tiny real Stable Diffusion pipeline (built in code, CPU, seconds)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from conftest import CONFIGS
from tiny_sd import IMAGE_SIZE, save_tiny_sd
from vdu_lightning import ForgetSetDataModule, ParameterPrior
from vdu_lightning.cli import VDUCLI, main
from vdu_lightning.modules.text_to_image import TextToImageVDUModule
from vdu_lightning.pipelines import load_pipeline


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_sd(tmp_path_factory.mktemp("sd") / "pipeline")


@pytest.fixture
def forget_folder(tmp_path: Path) -> Path:
    """Four 16×16 images with captions, in the layout of diffusers' training scripts."""
    folder = tmp_path / "forget"
    folder.mkdir()
    generator = np.random.default_rng(0)
    rows = []
    for i in range(4):
        pixels = generator.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"a painting in the style of van gogh {i}"})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return folder


def prior_over(module: TextToImageVDUModule, include: list[str]) -> ParameterPrior:
    generator = torch.Generator().manual_seed(1)
    snapshots = [{n: p.detach() + 1e-2 * torch.randn(p.shape, generator=generator)
                  for n, p in module.unet.named_parameters()} for _ in range(3)]
    return ParameterPrior.from_tensors(snapshots, "finetune", include=include)


def test_cross_attention_unlearning_moves_only_that_subset_and_exports_a_pipeline(
        sd_dir: Path, forget_folder: Path, tmp_path: Path) -> None:
    module = TextToImageVDUModule(str(sd_dir), gamma=0.5, lr=1e-2)
    before = {n: p.detach().clone() for n, p in module.unet.named_parameters()}
    # A prior over the whole UNet: the module keeps only its trainable (cross-attention) part.
    module.set_prior(prior_over(module, include=None))
    assert module.prior.names == module.trainable_names()
    assert all(".attn2." in n for n in module.prior.names)
    data = ForgetSetDataModule(dataset="folder", root=str(forget_folder),
                               forget_folder=str(forget_folder), image_size=IMAGE_SIZE,
                               batch_size=2, eval_size=4)
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, limit_val_batches=0,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(module, datamodule=data)
    moved = {n for n, p in module.unet.named_parameters() if not torch.equal(p, before[n])}
    assert moved and moved <= set(module.trainable_names())

    module.save_pretrained(tmp_path / "unlearned")
    exported = StableDiffusionPipeline.from_pretrained(tmp_path / "unlearned",
                                                       local_files_only=True)
    original = load_pipeline(sd_dir)
    for name, p in exported.unet.named_parameters():
        assert torch.equal(p, module.unet.get_parameter(name).detach().cpu())
    for name, p in exported.vae.named_parameters():
        assert torch.equal(p, original.vae.get_parameter(name))
    images = exported("a painting", num_inference_steps=2, height=IMAGE_SIZE, width=IMAGE_SIZE,
                      generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3) and np.isfinite(images).all()


@pytest.mark.parametrize("part", ["vae", "text_encoder", "tokenizer", "unet", "scheduler"])
def test_a_pipeline_directory_without_a_part_is_named(sd_dir: Path, tmp_path: Path,
                                                      part: str) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(sd_dir, broken)
    shutil.rmtree(broken / part)
    with pytest.raises(FileNotFoundError, match=rf"is not a Stable Diffusion pipeline directory: "
                                                rf"it lacks \['{part}'\]"):
        TextToImageVDUModule(str(broken))


def test_an_unknown_trainable_subset_is_refused_before_loading(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"trainable must be one of \['attention', "
                                         r"'cross_attention', 'full'\]"):
        TextToImageVDUModule(str(tmp_path / "not_read"), trainable="crossattn")


def _captioned_folder(folder: Path, count: int, caption: str, seed: int) -> None:
    folder.mkdir(parents=True)
    generator = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        pixels = generator.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"{caption} {i}"})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))


def test_the_shipped_config_fits_validates_and_exports_through_the_cli(tmp_path: Path) -> None:
    # What configs/sd/feature_unlearning.yaml expects, in tiny: SD v1-1 ... v1-4 and data.
    for version in range(1, 5):
        save_tiny_sd(tmp_path / f"models/stable-diffusion-v1-{version}", seed=version)
    _captioned_folder(tmp_path / "data/forget", 4, "a painting by van gogh", seed=0)
    _captioned_folder(tmp_path / "data/reference", 20, "a photo of a house", seed=1)
    config = str(CONFIGS / "sd" / "feature_unlearning.yaml")
    tiny = ["--trainer.accelerator=cpu", "--trainer.max_steps=2", "--trainer.limit_val_batches=1",
            "--trainer.val_check_interval=1", "--data.init_args.image_size=16"]
    main(["fit", "--config", config, *tiny])

    prior = ParameterPrior.load(tmp_path / "runs/sd/prior_cross_attention.safetensors")
    assert (prior.source, prior.count) == ("trajectory", 4)
    assert prior.names and all(".attn2." in n for n in prior.names)
    unlearned = StableDiffusionPipeline.from_pretrained(tmp_path / "runs/sd/unlearned",
                                                        local_files_only=True)
    original = load_pipeline(tmp_path / "models/stable-diffusion-v1-4")
    moved = {n for n, p in unlearned.unet.named_parameters()
             if not torch.equal(p, original.unet.get_parameter(n))}
    assert moved and moved <= set(prior.names)

    # The exported pipeline is itself a starting point: validate it through the same config.
    cli = VDUCLI(args=["validate", "--config", config, *tiny,
                       "--model.init_args.pretrained=runs/sd/unlearned"])
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["val/forget_loss"]) and torch.isfinite(metrics["val/retain_loss"])
