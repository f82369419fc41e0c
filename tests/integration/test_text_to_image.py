"""Feature unlearning on a tiny real Stable Diffusion pipeline (built in code, CPU, seconds)."""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from conftest import CONFIGS
from tiny_sd import IMAGE_SIZE, captioned_folder, save_tiny_sd, tiny_sd_pipeline
from vdu_lightning import ForgetSetDataModule, ParameterPrior
from vdu_lightning.cli import VDUCLI, main
from vdu_lightning.methods.text_to_image.module import TextToImageVDUModule
from vdu_lightning.methods.text_to_image.pipelines import load_pipeline


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_sd(tmp_path_factory.mktemp("sd") / "pipeline")


@pytest.fixture
def forget_folder(tmp_path: Path) -> Path:
    return captioned_folder(tmp_path / "forget", 4, "a painting in the style of van gogh")


def prior_over(module: TextToImageVDUModule, include: list[str]) -> ParameterPrior:
    generator = torch.Generator().manual_seed(1)
    snapshots = [{n: p.detach() + 1e-2 * torch.randn(p.shape, generator=generator)
                  for n, p in module.unet.named_parameters()} for _ in range(3)]
    return ParameterPrior.from_tensors(snapshots, "finetune", include=include)


def frozen_weights(module: TextToImageVDUModule) -> dict[str, torch.Tensor]:
    return {f"{part}.{n}": p.detach().clone() for part in ("vae", "text_encoder")
            for n, p in module.frozen.get(part).named_parameters()}


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_cross_attention_unlearning_moves_only_that_subset_and_exports_a_pipeline(
        sd_dir: Path, forget_folder: Path, tmp_path: Path, precision: str) -> None:
    module = TextToImageVDUModule(str(sd_dir), gamma=0.5, lr=1e-2)
    before = {n: p.detach().clone() for n, p in module.unet.named_parameters()}
    frozen_before = frozen_weights(module)
    # A prior over the whole UNet: the module keeps only its trainable (cross-attention) part.
    module.set_prior(prior_over(module, include=None))
    assert module.prior.names == module.trainable_names()
    assert all(".attn2." in n for n in module.prior.names)
    data = ForgetSetDataModule(dataset="folder", root=str(forget_folder),
                               forget_folder=str(forget_folder), image_size=IMAGE_SIZE,
                               batch_size=2, eval_size=4)
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, limit_val_batches=0,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, precision=precision)
    trainer.fit(module, datamodule=data)
    moved = {n for n, p in module.unet.named_parameters() if not torch.equal(p, before[n])}
    assert moved and moved <= set(module.trainable_names())
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(module.unet.get_parameter(n)) for n in module.prior.names}
    # The VAE and the text encoder neither trained nor took gradients.
    for name, value in frozen_weights(module).items():
        assert torch.equal(value, frozen_before[name]), name
    assert not any(p.requires_grad or p.grad is not None for part in ("vae", "text_encoder")
                   for p in module.frozen.get(part).parameters())

    module.save_pretrained(tmp_path / "unlearned")
    exported = StableDiffusionPipeline.from_pretrained(tmp_path / "unlearned",
                                                       local_files_only=True)
    for name, p in exported.unet.named_parameters():
        assert torch.equal(p, module.unet.get_parameter(name).detach().cpu())
    images = exported("a painting", num_inference_steps=2, height=IMAGE_SIZE, width=IMAGE_SIZE,
                      generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3) and np.isfinite(images).all()


@pytest.mark.parametrize("part", ["vae", "text_encoder", "tokenizer", "unet", "scheduler",
                                  "model_index.json"])
def test_a_pipeline_directory_without_a_part_is_named(sd_dir: Path, tmp_path: Path,
                                                      part: str) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(sd_dir, broken)
    (broken / part).unlink() if part.endswith(".json") else shutil.rmtree(broken / part)
    with pytest.raises(FileNotFoundError, match=rf"is not a Stable Diffusion pipeline directory: "
                                                rf"it lacks \['{part}'\]"):
        TextToImageVDUModule(str(broken))


def test_an_unknown_trainable_subset_is_refused_before_loading(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"trainable must be one of \['attention', "
                                         r"'cross_attention', 'full'\]"):
        TextToImageVDUModule(str(tmp_path / "not_read"), trainable="crossattn")


def test_the_shipped_config_fits_validates_and_exports_through_the_cli(tmp_path: Path) -> None:
    # What configs/sd/feature_unlearning.yaml expects, in tiny: SD v1-1 ... v1-4 and data.
    for version in range(1, 5):
        save_tiny_sd(tmp_path / f"models/stable-diffusion-v1-{version}", seed=version)
    captioned_folder(tmp_path / "data/forget", 4, "a painting by van gogh", seed=0)
    captioned_folder(tmp_path / "data/reference", 20, "a photo of a house", seed=1)
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


def test_the_finetune_prior_config_makes_a_prior_from_the_models_own_generations(
        tmp_path: Path) -> None:
    save_tiny_sd(tmp_path / "models/stable-diffusion-v1-4")
    main(["generate-forget-set", "--pipeline", "models/stable-diffusion-v1-4", "--prompt",
          "a photograph", "-n", "4", "--num-inference-steps", "2", "--out",
          "data/own_generations"])
    # Two continuations of the config's 50 steps each (its K is 4).
    main(["fit", "--config", str(CONFIGS / "sd" / "prior_finetune.yaml"),
          "--trainer.accelerator=cpu", "--trainer.max_steps=100",
          "--data.init_args.image_size=16", "--model.init_args.lr=1e-3"])
    prior = ParameterPrior.load(tmp_path / "runs/sd/prior_finetune.safetensors")
    assert (prior.source, prior.count) == ("finetune", 2)
    assert prior.names and all(".attn2." in n for n in prior.names)
    assert max(float(v.max()) for v in prior.var.values()) > prior.min_var  # they moved apart

    module = TextToImageVDUModule("models/stable-diffusion-v1-4")
    module.set_prior(prior)  # the prior fits the module it was made for
    assert module.prior.names == prior.names


def test_cached_latents_are_drawn_like_fresh_ones_and_encode_each_image_once(
        sd_dir: Path) -> None:
    cached = TextToImageVDUModule(str(sd_dir), cache_latents=True)
    fresh = TextToImageVDUModule(str(sd_dir))
    calls = []
    cached.frozen.get("vae").encoder.register_forward_hook(
        lambda module, args, output: calls.append(args[0].shape[0]))
    images = torch.rand(3, 3, IMAGE_SIZE, IMAGE_SIZE) * 2 - 1
    for seed in (0, 1):
        expected = fresh.encode_images(images, torch.Generator().manual_seed(seed))
        got = cached.encode_images(images, torch.Generator().manual_seed(seed))
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    cached.encode_images(images[[2, 0]], None)  # shuffled: found by content
    assert calls == [3]
    assert not torch.equal(cached.encode_images(images, torch.Generator().manual_seed(0)),
                           cached.encode_images(images, torch.Generator().manual_seed(1)))


def test_gradient_checkpointing_gives_the_same_step(sd_dir: Path, forget_folder: Path) -> None:
    weights = []
    for checkpointing in (False, True):
        module = TextToImageVDUModule(str(sd_dir), lr=1e-2, gradient_checkpointing=checkpointing)
        assert module.unet.is_gradient_checkpointing == checkpointing
        module.set_prior(prior_over(module, include=["*attn2.*"]))
        data = ForgetSetDataModule(dataset="folder", root=str(forget_folder),
                                   forget_folder=str(forget_folder), image_size=IMAGE_SIZE,
                                   batch_size=2, eval_size=4)
        pl.seed_everything(0)
        pl.Trainer(accelerator="cpu", max_steps=1, logger=False, limit_val_batches=0,
                   enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False).fit(module, datamodule=data)
        weights.append({n: p.detach().clone() for n, p in module.unet.named_parameters()})
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, rtol=1e-5, atol=1e-7)


def test_forget_images_need_captions_unless_a_concept_prompt_is_given(
        sd_dir: Path, forget_folder: Path) -> None:
    (forget_folder / "metadata.jsonl").unlink()  # no captions left
    data = ForgetSetDataModule(dataset="folder", root=str(forget_folder),
                               forget_folder=str(forget_folder), image_size=IMAGE_SIZE,
                               batch_size=2, eval_size=4)
    module = TextToImageVDUModule(str(sd_dir), lr=1e-2)
    module.set_prior(prior_over(module, include=["*attn2.*"]))
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, limit_val_batches=0,
                         enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match=r"4 forget images have no caption .*set concept_prompt"):
        trainer.fit(module, datamodule=data)
    assert trainer.global_step == 0

    prompted = TextToImageVDUModule(str(sd_dir), concept_prompt="van gogh")
    batch = {"image": torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE), "caption": ["", "a house"]}
    assert prompted.prompts_of(batch) == ["van gogh", "van gogh"]
    # Retain images keep their own captions: the retain loss measures what should stay.
    assert prompted.prompts_of(batch, forget=False) == ["", "a house"]


def test_trainable_subsets_by_name_and_by_pattern(sd_dir: Path) -> None:
    full = TextToImageVDUModule(str(sd_dir), trainable="full")
    assert full.trainable_names() == [n for n, _ in full.unet.named_parameters()]
    attention = TextToImageVDUModule(str(sd_dir), trainable="attention").trainable_names()
    cross = TextToImageVDUModule(str(sd_dir)).trainable_names()
    assert set(cross) < set(attention) < set(full.trainable_names())
    pattern = TextToImageVDUModule(str(sd_dir), trainable=["up_blocks.*attn2.to_k.*"])
    assert pattern.trainable_names() == [n for n in cross if n.startswith("up_blocks.")
                                         and ".attn2.to_k." in n]
    assert all(p.requires_grad == (n in pattern.trainable_names())
               for n, p in pattern.unet.named_parameters())


def test_a_v_prediction_pipeline_trains_against_v(tmp_path: Path) -> None:
    pipeline = tiny_sd_pipeline(tmp_path / "tokenizer")
    pipeline.scheduler.register_to_config(prediction_type="v_prediction")
    pipeline.save_pretrained(tmp_path / "sd2")
    with pytest.raises(ValueError, match="weighs errors of ε; this pipeline predicts "
                                         "'v_prediction'"):
        TextToImageVDUModule(str(tmp_path / "sd2"), timestep_weighting="elbo")
    module = TextToImageVDUModule(str(tmp_path / "sd2"), concept_prompt="a cat")
    images = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE) * 2 - 1
    _, target, t = module._predict_noise_of({"image": images}, torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)  # the same draws, by hand
    latents = module.encode_images(images, generator)
    _, noise, same_t = module.noised(latents, generator)
    assert torch.equal(t, same_t)
    torch.testing.assert_close(target, module.scheduler.get_velocity(latents, noise, t))
    assert not torch.allclose(target, noise)
