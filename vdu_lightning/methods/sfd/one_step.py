"""The one-step generators of SFD as diffusers pipelines.

``OneStepGeneratorPipeline`` (label-conditional): the directory holds ``unet/``,
``scheduler/`` (for ᾱ) and ``model_index.json`` with ``t_init``; an image is one network
call: x = f_θ(√(1 − ᾱ_init)·z, t_init, c). ``OneStepTextToImagePipeline``: the same on
latents, c a prompt's text embedding, with the VAE, text encoder and tokenizer beside it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiffusionPipeline,
    ImagePipelineOutput,
    UNet2DConditionModel,
    UNet2DModel,
)
from transformers import CLIPTextModel, CLIPTokenizer

from vdu_lightning.diffusion import sample_shape
from vdu_lightning.files import atomic_directory
from vdu_lightning.methods.sfd.score_distillation import x0_from_epsilon

if TYPE_CHECKING:
    from vdu_lightning.model_card import ExportCard


def one_step_images(unet: torch.nn.Module, alphas_cumprod: torch.Tensor, t_init: int,
                    z: torch.Tensor, labels: torch.Tensor | None = None,
                    context: torch.Tensor | None = None) -> torch.Tensor:
    """x = f_θ(√(1 − ᾱ_init)·z, t_init, c): the generator's images (unclipped, or latents)
    for noise z; c is ``labels`` (a label-conditional UNet) or ``context`` (text embeddings
    for cross-attention)."""
    t = torch.full((z.shape[0],), t_init, device=z.device, dtype=torch.long)
    x_init = (1 - alphas_cumprod.to(z.device)[t_init]).sqrt() * z
    if context is not None:
        epsilon = unet(x_init, t, encoder_hidden_states=context).sample
    else:
        epsilon = unet(x_init, t, class_labels=labels).sample
    return x0_from_epsilon(x_init, epsilon, alphas_cumprod, t)


def check_output_type(output_type: str) -> None:
    if output_type not in ("pil", "np", "pt"):
        raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")


def image_output(pipeline: DiffusionPipeline, images: torch.Tensor, output_type: str,
                 return_dict: bool) -> ImagePipelineOutput | tuple:
    """Images in [-1, 1] ([N, C, H, W]) as ``output_type`` asks: ``pt`` as they are, ``np``
    ([N, H, W, C] in [0, 1]) or ``pil``."""
    if output_type != "pt":
        images = ((images + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
        if output_type == "pil":
            images = pipeline.numpy_to_pil(images)
    return ImagePipelineOutput(images=images) if return_dict else (images,)


def save_atomically(pipeline: DiffusionPipeline, path: str | os.PathLike,
                    card: ExportCard | None = None) -> None:
    """``save_pretrained`` (and ``card``'s README.md) into a new directory that replaces
    ``path`` only when whole."""
    with atomic_directory(path) as tmp:
        pipeline.save_pretrained(tmp, safe_serialization=True)
        if card is not None:
            card.write(tmp)


class OneStepGeneratorPipeline(DiffusionPipeline):
    """A one-step, label-conditional image generator.

    Import this class to load its directories: diffusers' own ``DiffusionPipeline`` does not
    know it.

    Example:
        >>> pipe = OneStepGeneratorPipeline.from_pretrained(
        ...     "runs/mnist5k/sfd_generator")  # doctest: +SKIP
        >>> pipe([0, 1, 2], generator=torch.Generator().manual_seed(0)).images  # doctest: +SKIP
    """

    def __init__(self, unet: UNet2DModel, scheduler: DDPMScheduler, t_init: int = 440) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(t_init=t_init)

    @torch.no_grad()
    def __call__(self, class_labels: list[int] | torch.Tensor,
                 generator: torch.Generator | None = None, output_type: str = "pil",
                 return_dict: bool = True) -> ImagePipelineOutput | tuple:
        """One image per label; noise from ``generator`` on the CPU (the same images on any
        device). ``output_type``: ``pil``, ``np`` (``[N, H, W, C]`` in [0, 1]) or ``pt``
        (``[N, C, H, W]`` in [-1, 1])."""
        check_output_type(output_type)
        labels = torch.as_tensor(class_labels, dtype=torch.long).flatten()
        num_classes = self.unet.config.num_class_embeds - 1  # the last embedding: no label
        if labels.numel() == 0 or labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"class_labels must be labels in 0..{num_classes - 1}, got "
                             f"{labels.tolist()}")
        z = torch.randn(len(labels), *sample_shape(self.unet), generator=generator)
        device = self.unet.device
        images = one_step_images(self.unet, self.scheduler.alphas_cumprod, self.config.t_init,
                                 z.to(device, self.unet.dtype), labels.to(device)).clamp(-1, 1)
        return image_output(self, images, output_type, return_dict)

    def save_atomically(self, path: str | os.PathLike, card: ExportCard | None = None) -> None:
        """``save_pretrained`` (and ``card``'s README.md) into a new directory that replaces
        ``path`` only when whole."""
        save_atomically(self, path, card)


class OneStepTextToImagePipeline(DiffusionPipeline):
    """A one-step text-to-image generator: the distilled UNet with the frozen VAE, text
    encoder and tokenizer of the pipeline it came from.

    Import this class to load its directories: diffusers' own ``DiffusionPipeline`` does not
    know it.

    Example:
        >>> pipe = OneStepTextToImagePipeline.from_pretrained("runs/sd/sfd")  # doctest: +SKIP
        >>> pipe(["a red car"], generator=torch.Generator().manual_seed(0)).images
        ... # doctest: +SKIP
    """

    def __init__(self, unet: UNet2DConditionModel, vae: AutoencoderKL,
                 text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                 scheduler: DDPMScheduler, t_init: int = 625) -> None:
        super().__init__()
        self.register_modules(unet=unet, vae=vae, text_encoder=text_encoder,
                              tokenizer=tokenizer, scheduler=scheduler)
        self.register_to_config(t_init=t_init)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], generator: torch.Generator | None = None,
                 output_type: str = "pil", return_dict: bool = True
                 ) -> ImagePipelineOutput | tuple:
        """One image per prompt; noise from ``generator`` on the CPU (the same images on any
        device). ``output_type`` as ``OneStepGeneratorPipeline``'s."""
        check_output_type(output_type)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("prompt must be a prompt or a non-empty list of prompts")
        device = self.unet.device
        ids = self.tokenizer(prompts, padding="max_length", truncation=True,
                             max_length=self.tokenizer.model_max_length,
                             return_tensors="pt").input_ids
        context = self.text_encoder(ids.to(device))[0].to(self.unet.dtype)
        config = self.unet.config
        z = torch.randn(len(prompts), config.in_channels, config.sample_size,
                        config.sample_size, generator=generator)
        latents = one_step_images(self.unet, self.scheduler.alphas_cumprod, self.config.t_init,
                                  z.to(device, self.unet.dtype), context=context)
        scaled = (latents / self.vae.config.scaling_factor).to(self.vae.dtype)
        images = self.vae.decode(scaled).sample.float().clamp(-1, 1)
        return image_output(self, images, output_type, return_dict)

    def save_atomically(self, path: str | os.PathLike, card: ExportCard | None = None) -> None:
        """``save_pretrained`` (and ``card``'s README.md) into a new directory that replaces
        ``path`` only when whole."""
        save_atomically(self, path, card)
