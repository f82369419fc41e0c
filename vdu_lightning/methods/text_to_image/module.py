"""VDU feature unlearning on Stable-Diffusion-style models (docs/method.md §5), and the fine-tuning
that makes its ``finetune`` prior.

``TextToImageVDUModule``: the same loss as ``VDUModule`` on ε_θ(z_t, t, c), z the frozen VAE's
latents of the forget images, c the frozen text encoder's embedding of each image's caption
(or of one concept prompt). Only a chosen subset of the UNet moves (``trainable``), and the
prior covers that subset. ``TextToImageFinetuneModule`` lowers the same denoising error
instead: K short continuations of it on the model's own generations, collected by
``PriorSnapshot(source="finetune")``, make the prior. Both export a pipeline directory that
``StableDiffusionPipeline.from_pretrained`` loads.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from typing_extensions import override

from vdu_lightning.losses import denoising_error
from vdu_lightning.modules.unlearning import UnlearningModule
from vdu_lightning.methods.vdu.module import VDUModule
from vdu_lightning.methods.text_to_image.pipelines import load_pipeline, save_pipeline
from vdu_lightning.prior import ParameterPrior, select_names
from vdu_lightning.model_card import ExportCard, model_card

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


def check_captions(captions: Sequence[str], files: Sequence[Any] | None = None) -> None:
    """Refuse empty captions of forget images, naming (some of) them."""
    empty = [i for i, caption in enumerate(captions) if not str(caption).strip()]
    if empty:
        named = [str(files[i]) for i in empty[:3]] if files is not None else empty[:3]
        raise ValueError(
            f"{len(empty)} forget images have no caption (e.g. {named}): give each one a "
            "caption (metadata.jsonl or a .txt beside it), or set concept_prompt"
        )


class TextToImageModel:
    """What the text-to-image modules share (mixed in before an ``UnlearningModule``): the
    pipeline's parts, latents, text conditioning, which UNet parameters train, generation
    and export. The VAE and the text encoder stay frozen and outside the checkpoints (they
    are read again from ``pretrained``).

    Options shared by both modules:
        trainable: ``cross_attention`` (default), ``attention``, ``full``, or a list of
            shell-style UNet parameter-name patterns.
        concept_prompt: condition every image on this prompt instead of its caption.
        cache_latents: keep each image's latent distribution after its first encoding
            (the VAE runs once per image; latents are still drawn anew every step).
        gradient_checkpointing: recompute the UNet's activations in backward (less memory,
            about a third more time).
    """

    def _init_text_to_image(self, trainable: str | Sequence[str]) -> None:
        names = self.trainable_names()
        if not names:
            raise ValueError(f"trainable={trainable!r} matches no parameter of the UNet")
        for name, parameter in self.unet.named_parameters():
            parameter.requires_grad_(name in names)
        if self.hparams.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self._latent_cache: dict[Any, Any] = {}

    # ---- the model ------------------------------------------------------------------------
    @override
    def load_model(self) -> tuple[nn.Module, DDPMScheduler, None]:
        pipeline = load_pipeline(self.pretrained)
        # Frozen parts live outside the module's children (``FrozenNetworks``).
        self.frozen.add("vae", pipeline.vae)
        self.frozen.add("text_encoder", pipeline.text_encoder)
        self.tokenizer = pipeline.tokenizer
        # Training noises with DDPM's forward process whatever sampler the pipeline ships.
        scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
        if (scheduler.config.prediction_type != "epsilon"
                and self.timestep_weighting != "simple"):
            raise ValueError(f"timestep_weighting={self.timestep_weighting!r} weighs "
                             "errors of ε; this pipeline predicts "
                             f"{scheduler.config.prediction_type!r}: use 'simple'")
        return pipeline.unet, scheduler, None

    def trainable_names(self) -> list[str]:
        return select_names((n for n, _ in self.unet.named_parameters()),
                            trainable_patterns(self.hparams.trainable))

    @override
    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the pipeline takes and makes (the data are checked
        against it), not of its latents."""
        vae = self.frozen.get("vae")
        size = self.unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
        return (vae.config.in_channels, size, size)

    # ---- the loss -------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor,
                      generator: torch.Generator | None) -> torch.Tensor:
        """Scaled latents z ~ q(z | x) of images in [-1, 1]."""
        vae = self.frozen.get("vae", self.device)
        if self.hparams.cache_latents:
            mean, std = self._cached_distributions(images, vae)
        else:
            distribution = vae.encode(images.to(vae.dtype)).latent_dist
            mean, std = distribution.mean, distribution.std
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        # fp32 whatever autocast gave the VAE: the targets of the loss are built from them.
        return ((mean + std * noise) * vae.config.scaling_factor).float()

    def _cached_distributions(self, images: torch.Tensor,
                              vae: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        # Keyed by the pixels: batches come shuffled, and an image has no index of its own.
        cache = self._latent_cache
        keys = [hashlib.sha1(image.cpu().numpy().tobytes()).hexdigest() for image in images]
        new = [i for i, key in enumerate(keys) if key not in cache]
        if new:
            distribution = vae.encode(images[new].to(vae.dtype)).latent_dist
            for i, mean, std in zip(new, distribution.mean, distribution.std):
                cache[keys[i]] = (mean.cpu(), std.cpu())
        mean = torch.stack([cache[key][0] for key in keys]).to(images.device)
        std = torch.stack([cache[key][1] for key in keys]).to(images.device)
        return mean, std

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        tokenizer = self.tokenizer
        ids = tokenizer(list(prompts), padding="max_length", truncation=True,
                        max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
        return self.frozen.get("text_encoder", self.device)(ids.to(self.device))[0]

    def prompts_of(self, batch: dict[str, Any], forget: bool = True) -> list[str]:
        """The prompts a batch is conditioned on: ``concept_prompt`` for forget images when
        given, else their captions (which must not be empty: an empty caption is the
        unconditional prompt that classifier-free guidance uses for every prompt).
        Retain images always keep their own captions, empty ones included."""
        count = batch["image"].shape[0]
        if forget and self.hparams.concept_prompt is not None:
            return [self.hparams.concept_prompt] * count
        captions = list(batch.get("caption", [""] * count))
        if forget:
            check_captions(captions)
        return captions

    @override
    def setup(self, stage: str) -> None:
        super().setup(stage)
        forget = getattr(self.trainer.datamodule, "forget_set", None) if self._trainer else None
        if self.hparams.concept_prompt is None and hasattr(forget, "captions"):
            check_captions(forget.captions, getattr(forget, "files", None))

    @override
    def _predict_noise_of(self, batch: dict[str, Any], generator: torch.Generator | None,
                          forget: bool = True) -> tuple[torch.Tensor, ...]:
        """(UNet output, its target, t): the target is ε, or v for a v-prediction model."""
        latents = self.encode_images(batch["image"], generator)
        x_t, noise, t = self.noised(latents, generator)
        context = self.encode_text(self.prompts_of(batch, forget))
        target = (noise if self.scheduler.config.prediction_type == "epsilon"
                  else self.scheduler.get_velocity(latents, noise, t))
        return self.unet(x_t, t, encoder_hidden_states=context).sample, target, t

    @override
    def _evaluation_step(self, stage: str, batch: dict[str, Any], batch_idx: int,
                         dataloader_idx: int) -> None:
        # As the base, but retain images (loader 1) keep their captions (see prompts_of).
        generator = torch.Generator(self.device).manual_seed(batch_idx)
        predicted, target, _ = self._predict_noise_of(batch, generator, dataloader_idx != 1)
        part = ("forget", "retain")[dataloader_idx] if dataloader_idx < 2 else str(dataloader_idx)
        self.log(f"{stage}/{part}_loss", denoising_error(predicted, target), sync_dist=True,
                 add_dataloader_idx=False, prog_bar=part == "forget")

    # ---- generating and exporting ------------------------------------------------------------
    def pipeline(self, original: bool = False) -> StableDiffusionPipeline:
        """A pipeline around the unlearned UNet (sharing its weights), or the original one."""
        parts = {} if original else {"unet": self.unet}
        return load_pipeline(self.pretrained, **parts).to(self.device)

    @override
    def sample_from(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError("a text-to-image model samples from prompts: use "
                                  "module.pipeline()(prompt, generator=...)")

    @override
    def save_pretrained(self, path: str | os.PathLike, card: ExportCard | None = None) -> None:
        """Write the unlearned pipeline directory (atomically): the pre-trained VAE, text
        encoder, tokenizer and scheduler with the unlearned UNet, and a README card
        (``card`` or ``model_card()``)."""
        save_pipeline(self.pipeline(), path, card or self.model_card(where=str(path)))

    @override
    def model_card(self, forget_set: str | None = None, evaluation: dict | None = None,
                   picture: str | os.PathLike | None = None, where: str = "path/to/this/folder"
                   ) -> ExportCard:
        """The README card of this model's export (see ``vdu_lightning.model_card``)."""
        return model_card(type(self).__name__, "StableDiffusionPipeline", self.hparams,
                          self.pretrained, forget_set, evaluation, picture, where)


class TextToImageVDUModule(TextToImageModel, VDUModule):
    """Unlearn a feature (a style, a person, a concept) from a Stable Diffusion pipeline.

    Batches are forget images with captions (``{"image": [B, 3, H, W] in [-1, 1],
    "caption": [...]}``, e.g. ``ForgetSetDataModule(forget_folder=...)``). Only the UNet
    parameters in ``trainable`` that the prior covers move; a prior over more is cut to them.

    Args:
        pretrained: an SD 1.x/2.x pipeline directory, or its Hub ID (``vdu_lightning.hub``).
        gamma: γ in (0, 1), the weight of the stability term.
        trainable, concept_prompt, cache_latents, gradient_checkpointing: see
            ``TextToImageModel``.
        **kwargs: the ``UnlearningModule`` arguments (optimizer, lr, ...).

    Example:
        >>> module = TextToImageVDUModule("models/sd-1-5", gamma=0.9)  # doctest: +SKIP
    """

    def __init__(self, pretrained: str, gamma: float = 0.5,
                 trainable: str | list[str] = "cross_attention",
                 concept_prompt: str | None = None, cache_latents: bool = False,
                 gradient_checkpointing: bool = False, **kwargs: Any) -> None:
        trainable_patterns(trainable)  # refused before the pipeline is read
        pixel_only = {"residual": "plain", "hinge_factor": None, "forget_timesteps": None}
        changed = [name for name, default in pixel_only.items()
                   if kwargs.get(name, default) != default]
        if changed:
            raise ValueError(f"{changed} reshape the plasticity term of pixel-space DDPMs "
                             f"(VDUModule); {type(self).__name__} uses the method's own")
        super().__init__(pretrained, gamma, **kwargs)
        self._init_text_to_image(trainable)

    # ---- the prior: only the trainable subset ---------------------------------------------
    @override
    def set_prior(self, prior: ParameterPrior) -> None:
        """Use the part of ``prior`` over the trainable parameters (refused if none)."""
        keep = [n for n in self.trainable_names() if n in prior.mean]
        if not keep:
            patterns = trainable_patterns(self.hparams.trainable)
            raise ValueError(f"the prior covers none of the trainable parameters ({patterns}): "
                             f"build it with include={patterns}")
        uncovered = len(self.trainable_names()) - len(keep)
        if uncovered:
            rank_zero_warn(f"the prior covers {len(keep)} of the {len(keep) + uncovered} "
                           f"trainable tensors ({self.hparams.trainable}): only those move")
        super().set_prior(prior.restricted(keep) if len(keep) < len(prior.mean) else prior)


class TextToImageFinetuneModule(TextToImageModel, UnlearningModule):
    """Fine-tune the ``trainable`` part of a Stable Diffusion pipeline on its denoising
    error: with ``PriorSnapshot(source="finetune", weights="raw")``, K short continuations
    on the model's own generations (``vdu generate-forget-set``) make a prior over that part.

    Args:
        pretrained: an SD 1.x/2.x pipeline directory, or its Hub ID (``vdu_lightning.hub``).
        trainable, concept_prompt, cache_latents, gradient_checkpointing: see
            ``TextToImageModel``.
        **kwargs: the ``UnlearningModule`` arguments (optimizer, lr, ...).
    """

    def __init__(self, pretrained: str, trainable: str | list[str] = "cross_attention",
                 concept_prompt: str | None = None, cache_latents: bool = False,
                 gradient_checkpointing: bool = False, **kwargs: Any) -> None:
        trainable_patterns(trainable)
        super().__init__(pretrained, **kwargs)
        self._init_text_to_image(trainable)

    @override
    def unlearning_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        names = set(self.trainable_names())
        return ((n, p) for n, p in self.unet.named_parameters() if n in names)

    @override
    def objective(self, batch: Any) -> dict[str, torch.Tensor]:
        return {"loss": self.denoising_loss(self.split_batch(batch)[0])}
