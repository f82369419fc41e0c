"""Reading a diffusion model's weights from the files users have, never unpickling.

Accepted sources, for the prior (K checkpoints) and for the model to unlearn:

* a Lightning checkpoint of ``DiffusionModule`` (``.ckpt``): the EMA weights (``ema_unet.*``)
  or the raw ones (``unet.*``);
* a diffusers directory: a pipeline (``unet/`` + ``scheduler/``) or a bare UNet directory;
* a plain state dict of the UNet: ``.safetensors``, or ``.pt``/``.pth``/``.bin`` loaded with
  ``weights_only=True``.

No Lightning here: the files are read with torch, safetensors and diffusers alone.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel
from safetensors.torch import load_file

from vdu_lightning.diffusion import (
    PICKLED_WEIGHTS,
    SAFE_WEIGHTS,
    UNET_SUBFOLDER,
    build_scheduler,
    build_unet,
    load_pretrained,
)
from vdu_lightning.files import load_checkpoint
from vdu_lightning.hub import resolve_model

#: Which copy of a ``DiffusionModule`` checkpoint's UNet to read.
WEIGHT_PREFIXES = {"ema": "ema_unet.", "raw": "unet."}
_DIFFUSERS_WEIGHTS = (SAFE_WEIGHTS, PICKLED_WEIGHTS)


def _check_weights_choice(weights: str) -> str:
    if weights not in WEIGHT_PREFIXES:
        raise ValueError(f"weights must be one of {sorted(WEIGHT_PREFIXES)}, got {weights!r}")
    return WEIGHT_PREFIXES[weights]


def _diffusers_weights_file(directory: Path) -> Path:
    for folder in (directory / UNET_SUBFOLDER, directory):
        for name in _DIFFUSERS_WEIGHTS:
            if (folder / name).is_file():
                return folder / name
    raise FileNotFoundError(
        f"{directory} holds no UNet weights: expected {UNET_SUBFOLDER}/{_DIFFUSERS_WEIGHTS[0]} "
        f"(a diffusers pipeline) or {_DIFFUSERS_WEIGHTS[0]} (a bare UNet directory)"
    )


def _load_tensor_file(path: Path) -> dict[str, Any]:
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises its own error types for bad headers
            raise ValueError(f"cannot read {path}: not a valid safetensors file ({err})") from err
    return load_checkpoint(path)


def _select_unet(state: Mapping[str, Any], prefix: str, path: Path) -> dict[str, torch.Tensor]:
    """The UNet's tensors of a Lightning state dict, without their module prefix."""
    selected = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not selected:
        prefixes = sorted({k.split(".", 1)[0] + "." for k in state})
        raise ValueError(
            f"{path} has no weights under '{prefix}' (it has {prefixes}); use weights='raw' for "
            "a checkpoint without EMA weights" if prefix == WEIGHT_PREFIXES["ema"] else
            f"{path} has no weights under '{prefix}' (it has {prefixes})"
        )
    return selected


def read_unet_weights(path: str | os.PathLike, weights: str = "ema") -> dict[str, torch.Tensor]:
    """The UNet's parameters and buffers in one file or directory, by name.

    Args:
        path: a ``DiffusionModule`` checkpoint, a diffusers directory (local or a Hub ID,
            see ``vdu_lightning.hub``), or a UNet state dict.
        weights: ``ema`` or ``raw``: which UNet of a ``DiffusionModule`` checkpoint (other
            sources hold one set of weights and ignore it).

    Raises:
        FileNotFoundError: nothing at ``path``, or a directory with no UNet weights.
        ValueError: a corrupt file, or one holding anything but plain tensors.
    """
    prefix = _check_weights_choice(weights)
    path = resolve_model(path)
    if path.is_dir():
        return dict(_load_tensor_file(_diffusers_weights_file(path)))
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    content = _load_tensor_file(path)
    if "state_dict" in content and isinstance(content["state_dict"], Mapping):
        return _select_unet(content["state_dict"], prefix, path)
    tensors = {k: v for k, v in content.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{path} holds no tensors: expected a Lightning checkpoint or a state "
                         "dict of the UNet")
    return tensors


def _unet_from_hparams(hparams: Mapping[str, Any]) -> tuple[UNet2DModel, DDPMScheduler]:
    """Rebuild the architecture of a checkpoint written before configs were stored in it."""
    if hparams.get("unet") is not None:
        config = dict(hparams["unet"])
        if hparams.get("num_classes") is not None:
            config["num_class_embeds"] = hparams["num_classes"] + 1
        scheduler = build_scheduler(
            hparams.get("num_train_timesteps", 1000), hparams.get("beta_schedule", "linear"),
            hparams.get("beta_start", 1e-4), hparams.get("beta_end", 0.02),
        )
        return build_unet(config), scheduler
    if hparams.get("pretrained") is not None:
        return load_pretrained(hparams["pretrained"])
    raise ValueError("the checkpoint says neither its UNet configuration nor its pretrained "
                     "directory: it was not written by DiffusionModule")


def load_diffusion_model(
    path: str | os.PathLike, weights: str = "ema"
) -> tuple[UNet2DModel, DDPMScheduler, int | None]:
    """A UNet with its weights, its DDPM scheduler and its number of labels (None:
    unconditional), from a diffusers directory or a ``DiffusionModule`` checkpoint.
    """
    prefix = _check_weights_choice(weights)
    path = resolve_model(path)
    if not path.exists():
        raise FileNotFoundError(f"pretrained model not found: {path} (expected a diffusers "
                                "directory or a DiffusionModule checkpoint)")
    if path.is_dir():
        unet, scheduler = load_pretrained(path)
    else:
        checkpoint = load_checkpoint(path)
        if not isinstance(checkpoint.get("state_dict"), Mapping):
            raise ValueError(f"{path} is not a Lightning checkpoint (no 'state_dict'): give a "
                             "DiffusionModule checkpoint or a diffusers directory")
        if "unet_config" in checkpoint:
            unet = UNet2DModel.from_config(checkpoint["unet_config"])
            scheduler = DDPMScheduler.from_config(checkpoint["scheduler_config"])
        else:
            unet, scheduler = _unet_from_hparams(checkpoint.get("hyper_parameters", {}))
        state = _select_unet(checkpoint["state_dict"], prefix, path)
        try:
            unet.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(f"the weights in {path} do not fit its UNet: {err}") from err
    embeds = unet.config.num_class_embeds
    return unet, scheduler, None if embeds is None else embeds - 1
