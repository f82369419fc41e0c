"""Shared fixtures: no network, everything written under the test's own tmp_path."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from vdu_lightning.config_files import tiny_unet

# huggingface_hub reads HF_HUB_OFFLINE once, at import: set it before anything imports it.
os.environ["HF_HUB_OFFLINE"] = "1"

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


@pytest.fixture(autouse=True)
def offline_and_isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Tests never reach a network and never write outside their tmp_path."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    # datasets' Arrow cache: read at its import (the env), then from its config module.
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    if "datasets.config" in sys.modules:
        monkeypatch.setattr(sys.modules["datasets.config"], "HF_DATASETS_CACHE",
                            tmp_path / "hf-datasets")
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face Hub cache that this process and the processes it starts read
    (fill it with ``hub_cache.add_to_hub_cache``)."""
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # huggingface_hub reads the variable at import; its functions read this attribute.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


#: The UNet of configs/tests/tiny_pretrain.yaml (8×8, no attention), which the CLI smoke tests
#: and `vdu demo --quick` train too: one definition of the tests' tiny model.
TINY_UNET = tiny_unet(CONFIGS)


@pytest.fixture
def tiny_unet_config() -> dict:
    return dict(TINY_UNET)


@pytest.fixture
def pretrained(tmp_path: Path) -> Path:
    """A tiny pre-trained DDPM (100 timesteps) exported as a diffusers directory."""
    import torch

    from vdu_lightning import DiffusionModule

    torch.manual_seed(0)
    DiffusionModule(unet=dict(TINY_UNET), num_train_timesteps=100,
                    sample_steps=2).save_pretrained(tmp_path / "ddpm")
    return tmp_path / "ddpm"
