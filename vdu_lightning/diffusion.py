"""Pure torch/diffusers pieces: building and loading UNets, noising, noise prediction, EMA
weights, DDIM sampling.

No Lightning here: the LightningModules compose these functions.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

from vdu_lightning.files import PickledObjectsRefused, atomic_directory, load_checkpoint
from vdu_lightning.hub import resolve_model

if TYPE_CHECKING:
    from vdu_lightning.model_card import ExportCard

#: Sub-folders of a diffusers pipeline directory (the layout of e.g. ``google/ddpm-cifar10-32``).
UNET_SUBFOLDER = "unet"
SCHEDULER_SUBFOLDER = "scheduler"
#: The weights files of a diffusers model folder; diffusers reads the first when it is there.
SAFE_WEIGHTS, PICKLED_WEIGHTS = "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"
#: At most this many tensor names in an error message.
_SHOWN = 5
#: How torch's load_state_dict reports a tensor of another shape (shortened in our messages).
_SIZE_MISMATCH = re.compile(r"size mismatch for (\S+): copying a param with shape torch\.Size\("
                            r"(\[.*?\])\) from checkpoint, the shape in current model is "
                            r"torch\.Size\((\[.*?\])\)\.")


def build_unet(config: dict[str, Any]) -> UNet2DModel:
    """Build a randomly initialised ``UNet2DModel`` from its keyword arguments (as in YAML)."""
    try:
        return UNet2DModel(**config)
    except TypeError as err:
        raise ValueError(f"invalid UNet2DModel configuration {config}: {err}") from err


def build_scheduler(
    num_train_timesteps: int = 1000,
    beta_schedule: str = "linear",
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
) -> DDPMScheduler:
    """The DDPM noise schedule for training (epsilon prediction, samples clipped to [-1, 1])."""
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        beta_start=beta_start,
        beta_end=beta_end,
        prediction_type="epsilon",
        clip_sample=True,
    )


def load_pretrained(path: str | os.PathLike) -> tuple[UNet2DModel, DDPMScheduler]:
    """Load a UNet and its DDPM scheduler from a diffusers directory or Hub ID.

    Accepts a pipeline directory (``unet/`` and ``scheduler/`` sub-folders, as written by
    ``DDPMPipeline.save_pretrained``) or a bare UNet directory (``config.json`` beside the
    weights; the default DDPM schedule is then assumed), local or a Hub repository ID
    (``owner/name[@revision]``, see ``vdu_lightning.hub``).
    """
    path = resolve_model(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"pretrained model directory not found: {path} (expected a diffusers directory with "
            f"'{UNET_SUBFOLDER}/' and '{SCHEDULER_SUBFOLDER}/', or a bare UNet directory)"
        )
    if (path / UNET_SUBFOLDER / "config.json").is_file():
        unet = _load_unet(path, UNET_SUBFOLDER)
    elif (path / "config.json").is_file():
        unet = _load_unet(path, None)
    else:
        raise FileNotFoundError(
            f"{path} holds no UNet: expected {path / UNET_SUBFOLDER / 'config.json'} "
            f"or {path / 'config.json'}"
        )
    if (path / SCHEDULER_SUBFOLDER / "scheduler_config.json").is_file():
        scheduler = DDPMScheduler.from_pretrained(
            path, subfolder=SCHEDULER_SUBFOLDER, local_files_only=True
        )
    elif _config_class(path / "scheduler_config.json") in ("DDPMScheduler", "DDIMScheduler"):
        # A flat repository (a UNet folder with its scheduler's config beside it).
        scheduler = DDPMScheduler.from_pretrained(path, local_files_only=True)
    else:
        scheduler = build_scheduler()
    return unet, scheduler


def _config_class(config_file: Path) -> str | None:
    """The ``_class_name`` of a diffusers config file, or None if there is none."""
    try:
        return json.loads(config_file.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None


def _check_unet_folder(folder: Path) -> None:
    """Refuse, before its weights are read, a folder holding another kind of model (an SD
    pipeline's UNet2DConditionModel would be rebuilt as a UNet2DModel) or pickled objects
    (diffusers' own error would advise weights_only=False)."""
    config_file = folder / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
        found = config.get("_class_name", "UNet2DModel")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise ValueError(f"{config_file} is not a JSON object (a diffusers config): {err}") from err
    if found != "UNet2DModel":
        raise ValueError(
            f"{config_file} describes a {found}, not a UNet2DModel: `pretrained` takes a DDPM "
            "pipeline directory, a UNet2DModel directory or a DiffusionModule checkpoint"
            + (". A Stable Diffusion pipeline is unlearned with TextToImageVDUModule"
               if found == "UNet2DConditionModel" else "")
        )
    if not (folder / SAFE_WEIGHTS).is_file() and not (folder / PICKLED_WEIGHTS).is_file():
        # e.g. a Hub repository that offers pickled weights only (never fetched) or variants
        raise FileNotFoundError(f"{folder} holds no UNet weights: expected {SAFE_WEIGHTS}")
    if not (folder / SAFE_WEIGHTS).is_file():
        try:
            load_checkpoint(folder / PICKLED_WEIGHTS)  # memory-mapped: checks, reads little
        except PickledObjectsRefused as err:
            raise PickledObjectsRefused(
                f"{err}. This project never loads pickled objects. If you trust the file, "
                "convert it to safetensors once: torch.load(it, weights_only=False), then "
                f"safetensors.torch.save_file(<its UNet tensors>, '{folder / SAFE_WEIGHTS}')"
            ) from err


def _load_unet(path: Path, subfolder: str | None) -> UNet2DModel:
    """The UNet of a diffusers directory whose config.json and weights agree, tensor by tensor."""
    folder = path / subfolder if subfolder else path
    _check_unet_folder(folder)
    misfit = f"the weights in {folder} do not fit its config.json: "
    try:
        # diffusers only warns of tensors missing from the weights (and draws them at random):
        # the loading info says which.
        unet, info = UNet2DModel.from_pretrained(
            path, subfolder=subfolder, local_files_only=True, low_cpu_mem_usage=False,
            output_loading_info=True)
    except RuntimeError as err:  # torch's load_state_dict: one line per tensor of another shape
        shapes = [_SIZE_MISMATCH.sub(r"\1: weights \2, config \3", line.strip())
                  for line in str(err).splitlines()[1:] if _SIZE_MISMATCH.search(line)]
        if not shapes:  # another failure (memory, a damaged file): not ours to rename
            raise
        raise ValueError(misfit + f"{len(shapes)} tensors have other shapes, e.g. "
                         f"{shapes[:_SHOWN]}") from err
    missing, unexpected = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensors of the configured UNet are not in the weights, "
                        f"e.g. {missing[:_SHOWN]}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors of the weights are not in the configured "
                        f"UNet, e.g. {unexpected[:_SHOWN]}")
    if problems:
        raise ValueError(misfit + "; ".join(problems))
    return unet


def sample_shape(unet: UNet2DModel) -> tuple[int, int, int]:
    """(C, H, W) of the images the UNet denoises."""
    size = unet.config.sample_size
    height, width = (size, size) if isinstance(size, int) else size
    return (unet.config.in_channels, height, width)


def save_pretrained(unet: UNet2DModel, scheduler: DDPMScheduler, path: str | os.PathLike,
                    card: ExportCard | None = None) -> None:
    """Write a diffusers pipeline directory (``unet/``, ``scheduler/``, and ``card``'s
    README.md) atomically.

    It loads with ``load_pretrained`` and with diffusers' ``DDPMPipeline.from_pretrained``
    (unconditional models).
    """
    with atomic_directory(path) as tmp:
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp)
        if card is not None:
            card.write(tmp)


def predict_noise(
    unet: UNet2DModel,
    x_t: torch.Tensor,
    timesteps: torch.Tensor,
    class_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """ε_θ(x_t, t[, c]): the noise the UNet predicts."""
    return unet(x_t, timesteps, class_labels=class_labels).sample


def noised(scheduler: DDPMScheduler, images: torch.Tensor, generator: torch.Generator | None,
           timesteps: tuple[int, int] | None = None) -> tuple[torch.Tensor, ...]:
    """(x_t, ε, t): ``images`` noised by ``scheduler`` at t ~ U{lo..hi−1} with ε ~ N(0, I).

    ``timesteps`` is the band (lo, hi), all of 0..T−1 by default. t is drawn before ε, from
    ``generator``: every module that trains on noised images draws them here, in this order,
    so a seeded run is the same run whichever module makes it.
    """
    low, high = timesteps or (0, scheduler.config.num_train_timesteps)
    t = torch.randint(low, high, (images.shape[0],), device=images.device, generator=generator)
    noise = torch.randn(images.shape, device=images.device, generator=generator,
                        dtype=images.dtype)
    return scheduler.add_noise(images, noise, t), noise, t


@torch.no_grad()
def update_ema(ema: torch.nn.Module, network: torch.nn.Module, decay: float, step: int) -> None:
    """ema ← d·ema + (1 − d)·θ with d = min(decay, (1 + step)/(10 + step)): the warm-up keeps
    the average from remembering the random first weights.

    Written here rather than taken from a library, on purpose: Lightning's
    ``EMAWeightAveraging`` swaps the averaged weights into the module for validation and puts
    them in the checkpoint's ``state_dict`` in place of the raw ones, but the prior callbacks
    (``PriorSnapshot(weights=raw|ema)``), ``load_diffusion_model(weights=...)`` and sampling
    during training need both sets side by side, under fixed names; it has no warm-up either.
    diffusers' ``EMAModel`` keeps its shadow weights outside the module, so Lightning would
    neither move, shard nor checkpoint them, and exact resume would need a state of its own.
    An ``nn.Module`` copy gets all three for free.
    """
    d = min(decay, (1 + step) / (10 + step))
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in network.parameters()],
                         1.0 - d)


def seeded_noise(
    num: int, shape: tuple[int, ...], seed: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Gaussian noise drawn on the CPU from ``seed``: a seed gives the same images on any device."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((num, *shape), generator=generator).to(device)


@torch.no_grad()
def ddim_sample(
    unet: UNet2DModel,
    scheduler_config: dict[str, Any],
    noise: torch.Tensor,
    num_steps: int = 50,
    class_labels: torch.Tensor | None = None,
    null_label: int | None = None,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """Deterministic DDIM (η = 0) from ``noise`` to images in [-1, 1].

    For a label-conditional UNet, ``guidance_scale`` ≠ 1 applies classifier-free guidance:
    ε = ε(x, ∅) + w·(ε(x, c) − ε(x, ∅)), with ``null_label`` the "no label" embedding.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    guided = class_labels is not None and guidance_scale != 1.0
    if guided and null_label is None:
        raise ValueError("classifier-free guidance needs the model's null_label")
    # A fresh scheduler per call: set_timesteps mutates scheduler state.
    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(num_steps, device=noise.device)
    x = noise
    for t in scheduler.timesteps:
        timesteps = t.expand(x.shape[0])
        if guided:
            null = torch.full_like(class_labels, null_label)
            eps_c, eps_u = predict_noise(
                unet, x.repeat(2, 1, 1, 1), timesteps.repeat(2), torch.cat([class_labels, null])
            ).chunk(2)
            eps = eps_u + guidance_scale * (eps_c - eps_u)
        else:
            eps = predict_noise(unet, x, timesteps, class_labels)
        x = scheduler.step(eps, t, x, eta=0.0).prev_sample
    return x.clamp(-1.0, 1.0)


@torch.no_grad()
def sample_in_batches(
    unet: UNet2DModel,
    scheduler_config: dict[str, Any],
    noise: torch.Tensor,
    num_steps: int,
    labels: torch.Tensor | None = None,
    null_label: int | None = None,
    guidance_scale: float = 1.0,
    batch_size: int = 256,
) -> torch.Tensor:
    """``ddim_sample`` over ``noise`` in batches, with the UNet in eval mode meanwhile."""
    was_training = unet.training
    unet.eval()
    chunks = []
    try:
        for start in range(0, noise.shape[0], batch_size):
            chunk_labels = None if labels is None else labels[start:start + batch_size].to(
                noise.device)
            chunks.append(ddim_sample(
                unet, scheduler_config, noise[start:start + batch_size], num_steps=num_steps,
                class_labels=chunk_labels, null_label=null_label, guidance_scale=guidance_scale,
            ))
    finally:
        unet.train(was_training)
    return torch.cat(chunks)
