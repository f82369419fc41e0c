"""``TextToImageVDUModule``: VDU feature unlearning on Stable-Diffusion-style models (method §5).

The same loss as ``VDUModule`` on ε_θ(z_t, t, c): z the frozen VAE's latents of the forget
images, c the frozen text encoder's embedding of each image's caption (or of one concept
prompt). Only a chosen subset of the UNet moves (``trainable``), and the prior covers that
subset. The result is exported as a pipeline directory that
``StableDiffusionPipeline.from_pretrained`` loads.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Sequence
from typing import Any

import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from torch import nn

from vdu_lightning.modules.vdu import VDUModule
from vdu_lightning.pipelines import load_pipeline, save_pipeline
from vdu_lightning.prior import ParameterPrior

#: Named parameter subsets of a ``UNet2DConditionModel`` (shell-style name patterns).
TRAINABLE_SUBSETS = {
    # The key/query/value/out projections that read the text (diffusers names them attn2).
    "cross_attention": ["*attn2.*"],
    # Every transformer block: self- and cross-attention, their norms and feed-forwards.
    "attention": ["*attentions.*"],
    "full": ["*"],
}


def trainable_patterns(trainable: str | Sequence[str]) -> list[str]:
    """Name patterns of ``trainable``: a subset's name or a list of shell-style patterns."""
    if isinstance(trainable, str):
        if trainable not in TRAINABLE_SUBSETS:
            raise ValueError(f"trainable must be one of {sorted(TRAINABLE_SUBSETS)} or a list "
                             f"of parameter-name patterns, got {trainable!r}")
        return TRAINABLE_SUBSETS[trainable]
    patterns = list(trainable)
    if not patterns:
        raise ValueError("trainable is an empty list: name at least one parameter pattern")
    return patterns


class TextToImageVDUModule(VDUModule):
    """Unlearn a feature (a style, a person, a concept) from a local Stable Diffusion pipeline.

    Batches are forget images with captions (``{"image": [B, 3, H, W] in [-1, 1],
    "caption": [...]}``, e.g. ``ForgetSetDataModule(forget_folder=...)``). The VAE and the
    text encoder stay frozen and outside the checkpoints (they are read again from
    ``pretrained``); only the UNet parameters in ``trainable`` that the prior covers move.

    Args:
        pretrained: a local SD 1.x/2.x pipeline directory (never downloaded).
        gamma: γ in (0, 1), the weight of the stability term.
        trainable: ``cross_attention`` (default), ``attention``, ``full``, or a list of
            shell-style UNet parameter-name patterns.
        concept_prompt: condition every forget image on this prompt instead of its caption.
        **kwargs: the ``UnlearningModule`` arguments (optimizer, lr, ...).

    Example:
        >>> module = TextToImageVDUModule("models/sd-1-5", gamma=0.9)  # doctest: +SKIP
    """

    def __init__(self, pretrained: str, gamma: float = 0.5,
                 trainable: str | list[str] = "cross_attention",
                 concept_prompt: str | None = None, **kwargs: Any) -> None:
        self.patterns = trainable_patterns(trainable)
        super().__init__(pretrained, gamma, **kwargs)
        names = self.trainable_names()
        if not names:
            raise ValueError(f"trainable={trainable!r} matches no parameter of the UNet")

    # ---- the model ------------------------------------------------------------------------
    def load_model(self) -> tuple[nn.Module, DDPMScheduler, None]:
        pipeline = load_pipeline(self.hparams.pretrained)
        # Frozen parts live outside the module's children: not trained, not checkpointed,
        # not synchronised by DDP (as ``original_unet``).
        self.__dict__["_frozen"] = {
            "vae": pipeline.vae.requires_grad_(False).eval(),
            "text_encoder": pipeline.text_encoder.requires_grad_(False).eval(),
            "tokenizer": pipeline.tokenizer,
        }
        # Training noises with DDPM's forward process whatever sampler the pipeline ships.
        return pipeline.unet, DDPMScheduler.from_config(pipeline.scheduler.config), None

    def trainable_names(self) -> list[str]:
        return [n for n, _ in self.unet.named_parameters()
                if any(fnmatch.fnmatchcase(n, p) for p in self.patterns)]

    def _frozen_part(self, name: str) -> Any:
        part = self.__dict__["_frozen"][name]
        return part.to(self.device) if isinstance(part, nn.Module) else part

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the pipeline takes and makes (the data are checked
        against it), not of its latents."""
        vae = self.__dict__["_frozen"]["vae"]
        size = self.unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
        return (vae.config.in_channels, size, size)

    # ---- the prior: only the trainable subset ---------------------------------------------
    def set_prior(self, prior: ParameterPrior) -> None:
        """Use the part of ``prior`` over the trainable parameters (refused if none)."""
        keep = [n for n in self.trainable_names() if n in prior.mean]
        if not keep:
            raise ValueError(f"the prior covers none of the trainable parameters "
                             f"({self.patterns}): build it with include={self.patterns}")
        if len(keep) < len(prior.mean):
            prior = ParameterPrior({n: prior.mean[n] for n in keep},
                                   {n: prior.var[n] for n in keep}, prior.count, prior.source,
                                   prior.min_var, prior.num_floored, prior.dtypes)
        super().set_prior(prior)

    # ---- the loss -------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor,
                      generator: torch.Generator | None) -> torch.Tensor:
        vae = self._frozen_part("vae")
        latents = vae.encode(images.to(vae.dtype)).latent_dist.sample(generator)
        return latents * vae.config.scaling_factor

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        tokenizer = self._frozen_part("tokenizer")
        ids = tokenizer(list(prompts), padding="max_length", truncation=True,
                        max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
        return self._frozen_part("text_encoder")(ids.to(self.device))[0]

    def prompts_of(self, batch: dict[str, Any]) -> list[str]:
        count = batch["image"].shape[0]
        if self.hparams.concept_prompt is not None:
            return [self.hparams.concept_prompt] * count
        if "caption" not in batch:
            raise ValueError("the forget batches have no captions: give concept_prompt, or "
                             "use a forget folder with captions (metadata.jsonl or .txt files)")
        return list(batch["caption"])

    def _predict_noise_of(self, batch: dict[str, Any],
                          generator: torch.Generator | None) -> tuple[torch.Tensor, ...]:
        latents = self.encode_images(batch["image"], generator)
        x_t, noise, t = self.noised(latents, generator)
        context = self.encode_text(self.prompts_of(batch))
        return self.unet(x_t, t, encoder_hidden_states=context).sample, noise, t

    # ---- generating and exporting ------------------------------------------------------------
    def pipeline(self, original: bool = False) -> StableDiffusionPipeline:
        """A pipeline around the unlearned UNet (or the original one), sharing its weights."""
        pipeline = load_pipeline(self.hparams.pretrained)
        if not original:
            pipeline.unet = self.unet
        return pipeline.to(self.device)

    def sample_from(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError("a text-to-image model samples from prompts: use "
                                  "module.pipeline()(prompt, generator=...)")

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the unlearned pipeline directory (atomically): the pre-trained VAE, text
        encoder, tokenizer and scheduler with the unlearned UNet."""
        save_pipeline(self.pipeline().to("cpu"), path)
