"""configs/cifar10 run end to end on tiny stand-ins of google/ddpm-cifar10-32 and
uoft-cs/cifar10, kept under those IDs in a Hub cache built in the test (HF_HUB_OFFLINE=1)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from diffusers import DDPMPipeline
from huggingface_hub import ModelCard

from conftest import CONFIGS
from hub_cache import add_to_hub_cache, save_parquet_dataset
from vdu_lightning import DiffusionModule, ParameterPrior
from vdu_lightning.cli import main

#: A 3-channel UNet of 8x8 images in place of the 35.7 M-parameter original.
STAND_IN_UNET = {"sample_size": 8, "in_channels": 3, "out_channels": 3,
                 "block_out_channels": [16, 32], "layers_per_block": 1,
                 "down_block_types": ["DownBlock2D", "DownBlock2D"],
                 "up_block_types": ["UpBlock2D", "UpBlock2D"], "norm_num_groups": 8,
                 "add_attention": False}


@pytest.fixture
def stand_ins(tmp_path: Path, hub_cache: Path) -> None:
    torch.manual_seed(0)
    DiffusionModule(unet=STAND_IN_UNET, num_train_timesteps=100).save_pretrained(
        tmp_path / "stand-in-ddpm")
    add_to_hub_cache(hub_cache, "google/ddpm-cifar10-32", tmp_path / "stand-in-ddpm")
    add_to_hub_cache(hub_cache, "uoft-cs/cifar10", save_parquet_dataset(
        tmp_path / "stand-in-cifar", {"train": 200, "test": 20}, num_classes=10),
        repo_type="dataset")


def _small(config: str, tmp_path: Path, trainer: dict, **callbacks: dict) -> str:
    """The shipped config with a test-sized budget (same structure, smaller numbers):
    ``callbacks`` maps a callback's class name to the init_args it changes."""
    content = yaml.safe_load((CONFIGS / "cifar10" / config).read_text())
    content["trainer"].update(trainer, accelerator="cpu", enable_progress_bar=False)
    for callback in content["trainer"].get("callbacks", []):
        callback.setdefault("init_args", {}).update(
            callbacks.get(callback["class_path"].rsplit(".", 1)[-1], {}))
    path = tmp_path / f"small_{config}"
    path.write_text(yaml.safe_dump(content))
    return str(path)


def test_the_cifar10_recipe_runs_from_hub_ids(tmp_path: Path, stand_ins: None) -> None:
    # The evaluation classifier (32x32 RGB recipe; here the 8x8 stand-in images).
    main(["fit", "--config", _small("classifier.yaml", tmp_path,
                                    {"max_epochs": 1, "limit_train_batches": 2,
                                     "limit_val_batches": 1}),
          "--model.width=8"])
    assert (tmp_path / "runs/cifar10/classifier/model.safetensors").is_file()

    # The finetune prior: three continuations of the model read by ID, on the data by ID.
    main(["fit", "--config", _small("prior_finetune.yaml", tmp_path, {"max_steps": 6},
                                    PriorSnapshot={"every_n_steps": 2}),
          "--data.batch_size=8"])
    prior = ParameterPrior.load(tmp_path / "runs/cifar10/prior_finetune.safetensors")
    assert prior.count == 3 and prior.source == "finetune"

    # VDU: forget class 1, evaluate during fit, export with the card.
    main(["fit", "--config", _small("vdu.yaml", tmp_path,
                                    {"max_steps": 2, "val_check_interval": 2,
                                     "limit_val_batches": 1},
                                    UnlearningEvaluation={
                                        "num_samples": 20, "num_steps": 2, "batch_size": 20,
                                        "num_reference": 40, "likelihood_timesteps": 2}),
          "--data.forget_size=16", "--data.eval_size=8", "--data.batch_size=8"])
    export = tmp_path / "runs/cifar10/vdu_forget1"
    original = DDPMPipeline.from_pretrained(tmp_path / "stand-in-ddpm",
                                            local_files_only=True).unet
    unlearned = DDPMPipeline.from_pretrained(export, local_files_only=True).unet
    assert any(not torch.equal(p, original.get_parameter(n))
               for n, p in unlearned.named_parameters())
    card = ModelCard.load(export / "README.md")
    assert card.data.base_model == "google/ddpm-cifar10-32"
    assert "to forget class(es) [1] of the data set `uoft-cs/cifar10`" in card.text
    assert "| u_fid_ratio |" in card.text and (export / "before_after.png").is_file()
