"""``TextToImageSFDModule``: Score Forgetting Distillation of a Stable-Diffusion-style pipeline
into a one-step text-to-image generator (docs/method.md §6).

The teacher is the pipeline's UNet; the VAE and the text encoder stay frozen. The generator
works on latents: G_θ(z, c) = f_θ(√(1 − ᾱ_init)·z, t_init, c), c the text encoder's embedding
of a prompt. Prompts of the concept to forget are scored by the teacher under their safe
override prompt (e.g. "a person" for a celebrity's name), every other prompt under itself, so
the generator keeps drawing the retained prompts as the teacher does and draws the override's
content for the forgotten ones. No image is read, and none is needed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
import torch
from diffusers import DDPMScheduler
from torch import nn
from typing_extensions import override

from vdu_lightning.methods.sfd.distillation import ScoreDistillationModule
from vdu_lightning.methods.sfd.one_step import OneStepTextToImagePipeline, one_step_images
from vdu_lightning.methods.text_to_image.pipelines import load_pipeline
from vdu_lightning.model_card import ExportCard, model_card


def _prompt_list(name: str, prompts: str | Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = [str(p) for p in prompts]
    if not prompts or not all(p.strip() for p in prompts):
        raise ValueError(f"{name} must be one or more non-empty prompts, got {prompts!r}")
    return prompts


class TextToImageSFDModule(ScoreDistillationModule):
    """Distil a text-to-image pipeline into a one-step generator that forgets a concept.

    Each iteration draws ``batch_size`` prompts uniformly from ``forget_prompts`` and
    ``retain_prompts``; a forget prompt's teacher prompt is its override. The networks see
    the text encoder's embeddings (computed once per device: the prompts are fixed).

    Args:
        pretrained: a Stable-Diffusion-style pipeline directory or its Hub ID (ε-predicting,
            as SD 1.x; v-prediction models such as SD 2.x-768 are refused).
        forget_prompts: prompts of the concept to forget.
        retain_prompts: prompts the generator must keep drawing as the teacher does.
        override_prompts: the safe prompt the teacher sees for each forget prompt: one for
            all of them, or one per forget prompt (in order).
        guidance_scale: classifier-free guidance of the teacher's prediction (1: none, one
            teacher call; s > 1: ε_u + s·(ε_c − ε_u), two).
        gradient_checkpointing: recompute the generator's and the fake score's activations
            in backward (less memory, more time).
        The other arguments are ``SFDModule``'s (t_min, t_max, t_init on the pipeline's
        0..T−1).

    Example:
        >>> module = TextToImageSFDModule(
        ...     "models/sd-1.4", forget_prompts=["a portrait of Jane Doe"],
        ...     retain_prompts=["a portrait of a woman", "a red car"],
        ...     override_prompts="a portrait of a person")  # doctest: +SKIP
    """

    def __init__(
        self,
        pretrained: str,
        forget_prompts: Sequence[str],
        retain_prompts: Sequence[str],
        override_prompts: str | Sequence[str],
        guidance_scale: float = 1.0,
        alpha: float = 1.2,
        retain_weight: float = 1.0,
        forget_weight: float = 1.0,
        forget_warmup_steps: int = 0,
        t_min: int = 20,
        t_max: int = 980,
        t_init: int = 625,
        lr: float = 1e-6,
        betas: tuple[float, float] = (0.0, 0.999),
        grad_clip: float = 1.0,
        ema_decay: float = 0.999,
        batch_size: int = 4,
        steps_per_epoch: int = 1000,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        forget = _prompt_list("forget_prompts", forget_prompts)
        retain = _prompt_list("retain_prompts", retain_prompts)
        overrides = _prompt_list("override_prompts", override_prompts)
        if len(overrides) == 1:
            overrides = overrides * len(forget)
        if len(overrides) != len(forget):
            raise ValueError(f"override_prompts must be one prompt or one per forget prompt "
                             f"({len(forget)}), got {len(overrides)}")
        shared = sorted(set(forget) & set(retain + overrides))
        if shared:
            raise ValueError(f"a forget prompt cannot also be retained or an override: "
                             f"{shared}")
        if guidance_scale < 1.0:
            raise ValueError(f"guidance_scale must be >= 1 (1: no guidance), got "
                             f"{guidance_scale!r}")
        pipeline = load_pipeline(pretrained)
        self.frozen.add("vae", pipeline.vae)
        self.frozen.add("text_encoder", pipeline.text_encoder)
        self.tokenizer = pipeline.tokenizer
        # Training noises with DDPM's forward process whatever sampler the pipeline ships.
        self.distil(pipeline.unet, DDPMScheduler.from_config(pipeline.scheduler.config))
        if gradient_checkpointing:
            self.generator.enable_gradient_checkpointing()
            self.fake_score.enable_gradient_checkpointing()
        # One table of prompts; a condition is an index into it: the forget prompts, the
        # retained ones, each forget prompt's override, and the empty (unconditional) prompt.
        self.prompts = [*forget, *retain, *overrides, ""]
        self.num_forget, self.num_retain = len(forget), len(retain)
        self._embeddings: torch.Tensor | None = None

    # ---- conditions -------------------------------------------------------------------------
    def prompt_embeddings(self) -> torch.Tensor:
        """The text encoder's embeddings of ``self.prompts`` on this device, [P, L, D]."""
        if self._embeddings is None or self._embeddings.device != self.device:
            tokenizer = self.tokenizer
            ids = tokenizer(self.prompts, padding="max_length", truncation=True,
                            max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
            with torch.no_grad():
                encoder = self.frozen.get("text_encoder", self.device)
                self._embeddings = encoder(ids.to(self.device))[0].float()
        return self._embeddings

    @override
    def draw_conditions(self, generator: torch.Generator | None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt indices drawn uniformly from the forget and retained prompts."""
        indices = torch.randint(0, self.num_forget + self.num_retain, (self.hparams.batch_size,),
                                device=self.device, generator=generator)
        return indices, indices < self.num_forget

    @override
    def teacher_conditions(self, conditions: torch.Tensor, forget: torch.Tensor,
                           samples: torch.Tensor, generator: torch.Generator | None
                           ) -> torch.Tensor:
        """Each forget prompt's override index (i → F + R + i); the others unchanged."""
        return torch.where(forget, conditions + self.num_forget + self.num_retain, conditions)

    @override
    def predict(self, network: nn.Module, x_t: torch.Tensor, t: torch.Tensor,
                conditions: torch.Tensor, teacher: bool = False) -> torch.Tensor:
        embeddings = self.prompt_embeddings()
        context = embeddings[conditions]
        scale = self.hparams.guidance_scale
        if not teacher or scale == 1.0:
            return network(x_t, t, encoder_hidden_states=context).sample
        unconditional = embeddings[-1].expand_as(context)
        both = network(torch.cat([x_t, x_t]), torch.cat([t, t]),
                       encoder_hidden_states=torch.cat([unconditional, context])).sample
        epsilon_u, epsilon_c = both.chunk(2)
        return epsilon_u + scale * (epsilon_c - epsilon_u)

    @override
    def generate(self, z: torch.Tensor, conditions: torch.Tensor,
                 ema: bool = False) -> torch.Tensor:
        """One-step latents for noise ``z`` and prompt indices ``conditions``."""
        return one_step_images(self.ema_generator if ema else self.generator,
                               self.scheduler.alphas_cumprod, self.hparams.t_init, z,
                               context=self.prompt_embeddings()[conditions])

    @property
    @override
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the generator's latents."""
        config = self.generator.config
        return (config.in_channels, config.sample_size, config.sample_size)

    # ---- export ------------------------------------------------------------------------------
    def pipeline(self, ema: bool = True) -> OneStepTextToImagePipeline:
        """The (EMA) generator with the frozen VAE, text encoder and tokenizer, as a
        ``OneStepTextToImagePipeline`` (sharing their weights)."""
        return OneStepTextToImagePipeline(
            unet=self.ema_generator if ema else self.generator,
            vae=self.frozen.get("vae", self.device),
            text_encoder=self.frozen.get("text_encoder", self.device),
            tokenizer=self.tokenizer, scheduler=self.scheduler, t_init=self.hparams.t_init)

    def save_pretrained(self, path: str | os.PathLike, card: ExportCard | None = None) -> None:
        """Write the EMA generator's pipeline directory with a README card, atomically."""
        self.pipeline().save_atomically(path, card or self.model_card(where=str(path)))

    def model_card(self, forget_set: str | None = None, evaluation: dict | None = None,
                   picture: str | os.PathLike | None = None, where: str = "path/to/this/folder"
                   ) -> ExportCard:
        """The README card of this model's export (see ``vdu_lightning.model_card``)."""
        return model_card(type(self).__name__, "OneStepTextToImagePipeline", self.hparams,
                          self.hparams.pretrained, forget_set, evaluation, picture, where)
