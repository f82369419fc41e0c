"""``DiffusionModule``: pre-trains a DDPM (unconditional or label-conditional) with EMA weights."""

from __future__ import annotations

import copy
import os
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from typing_extensions import override

from vdu_lightning.diffusion import (
    build_scheduler,
    build_unet,
    load_pretrained,
    noised,
    predict_noise,
    sample_in_batches,
    sample_shape,
    save_pretrained,
    seeded_noise,
    update_ema,
)
from vdu_lightning.modules.compat import check_data_fits_model
from vdu_lightning.modules.noise import NoiseStreams, NoiseStreamsHooks
from vdu_lightning.model_card import ExportCard, model_card


class DiffusionModule(NoiseStreamsHooks, pl.LightningModule):
    """Trains a diffusers ``UNet2DModel`` as an ε-predicting DDPM, keeping an EMA copy.

    The EMA weights are what ``sample`` and ``save_pretrained`` use by default: they give
    clearly better samples than the raw weights after short training.

    Label-conditional training: set ``num_classes``. The UNet then gets ``num_classes + 1``
    class embeddings, the last one meaning "no label"; with probability ``label_dropout`` a
    training label is replaced by it, which is what classifier-free guidance needs.

    Args:
        unet: ``UNet2DModel`` keyword arguments (its YAML configuration). Give this or
            ``pretrained``.
        pretrained: a diffusers directory (``unet/`` + ``scheduler/``) or a Hub ID such as
            ``google/ddpm-cifar10-32`` (``vdu_lightning.hub``) to start from; the schedule
            arguments are then read from it.
        num_classes: number of labels for a label-conditional model; None: unconditional.
        label_dropout: probability of dropping a label during training (conditional only).
        num_train_timesteps, beta_schedule, beta_start, beta_end: the DDPM schedule.
        lr, weight_decay, betas, warmup_steps: AdamW with a linear warm-up.
        ema_decay: decay of the EMA weights (ramped up as ``(1+n)/(10+n)`` early on).
        sample_steps: DDIM steps used by ``sample``.
        guidance_scale: classifier-free guidance weight used by ``sample`` (1: none).

    Example:
        >>> module = DiffusionModule(unet={"sample_size": 16, "in_channels": 1,
        ...     "out_channels": 1, "block_out_channels": [32, 64], "norm_num_groups": 8,
        ...     "down_block_types": ["DownBlock2D", "DownBlock2D"],
        ...     "up_block_types": ["UpBlock2D", "UpBlock2D"]})
        >>> module.sample(4, num_steps=2).shape
        torch.Size([4, 1, 16, 16])
    """

    def __init__(
        self,
        unet: dict[str, Any] | None = None,
        pretrained: str | None = None,
        num_classes: int | None = None,
        label_dropout: float = 0.1,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        ema_decay: float = 0.999,
        sample_steps: int = 50,
        guidance_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if (unet is None) == (pretrained is None):
            raise ValueError("give exactly one of `unet` (a UNet2DModel configuration) or "
                             f"`pretrained` (a diffusers directory); got unet={unet!r}, "
                             f"pretrained={pretrained!r}")
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {label_dropout}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        self.save_hyperparameters()
        if pretrained is not None:
            self.unet, self.scheduler = load_pretrained(pretrained)
            # diffusers loads models in eval mode, and Lightning keeps the mode it finds.
            self.unet.train()
        else:
            config = dict(unet)
            if num_classes is not None:
                config["num_class_embeds"] = num_classes + 1
            self.unet = build_unet(config)
            self.scheduler = build_scheduler(
                num_train_timesteps, beta_schedule, beta_start, beta_end
            )
        self._check_conditioning(num_classes)
        self.ema_unet = copy.deepcopy(self.unet).requires_grad_(False)
        self.noise = NoiseStreams()

    def _check_conditioning(self, num_classes: int | None) -> None:
        embeds = self.unet.config.num_class_embeds
        if num_classes is None and embeds is not None:
            raise ValueError(
                f"the UNet is label-conditional ({embeds} class embeddings): set num_classes "
                f"(= {embeds - 1}, the last embedding meaning 'no label')"
            )
        if num_classes is not None and embeds != num_classes + 1:
            raise ValueError(
                f"num_classes={num_classes} needs a UNet with {num_classes + 1} class embeddings "
                f"(the last meaning 'no label'), but it has {embeds}"
            )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any) -> "DiffusionModule":
        """Start from a diffusers directory (``save_pretrained``'s output) or a Hub ID."""
        return cls(pretrained=str(path), **kwargs)

    # ---- properties other parts read ----------------------------------------------------
    @property
    def conditional(self) -> bool:
        return self.hparams.num_classes is not None

    @property
    def null_label(self) -> int | None:
        return self.hparams.num_classes if self.conditional else None

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return sample_shape(self.unet)

    # ---- training -----------------------------------------------------------------------
    @override
    def setup(self, stage: str) -> None:
        if self._trainer is not None and self.trainer.datamodule is not None:
            check_data_fits_model(self.trainer.datamodule, self.sample_shape, "the UNet")

    @property
    def noise_generator(self) -> torch.Generator | None:
        return self.noise.generator

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        # The architecture travels with the weights: the checkpoint alone rebuilds the model
        # (vdu_lightning.checkpoints.load_diffusion_model), also when it started from a
        # pretrained directory that is gone.
        checkpoint["unet_config"] = dict(self.unet.config)
        checkpoint["scheduler_config"] = dict(self.scheduler.config)

    def denoising_loss(
        self,
        unet: torch.nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor | None,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """Mean ‖ε − ε_θ(x_t, t[, c])‖² with t ~ U{0..T−1} and ε ~ N(0, I)."""
        x_t, noise, t = noised(self.scheduler, images, generator)
        return F.mse_loss(predict_noise(unet, x_t, t, labels).float(), noise.float())

    def _labels(self, batch: dict[str, torch.Tensor], drop: bool) -> torch.Tensor | None:
        if not self.conditional:
            return None
        labels = batch["label"]
        if drop and self.hparams.label_dropout > 0:
            dropped = torch.rand(labels.shape, device=labels.device,
                                 generator=self.noise_generator) < self.hparams.label_dropout
            labels = torch.where(dropped, torch.full_like(labels, self.null_label), labels)
        return labels

    @override
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.denoising_loss(
            self.unet, batch["image"], self._labels(batch, drop=True), self.noise_generator
        )
        self.log("train/loss", loss, prog_bar=True)
        return loss

    @override
    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        # Here rather than in on_train_batch_end: called only when the optimizer steps (also
        # under gradient accumulation), and before any callback's on_train_batch_end, so
        # callbacks (PriorSnapshot) see the EMA of the step just taken.
        super().optimizer_step(*args, **kwargs)
        self.update_ema()

    def update_ema(self) -> None:
        """The EMA weights follow the step just taken (``diffusion.update_ema``)."""
        update_ema(self.ema_unet, self.unet, self.hparams.ema_decay, self.global_step)

    @override
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        # The same noise and timesteps for a batch at every validation: comparable curves.
        generator = torch.Generator(self.device).manual_seed(batch_idx)
        labels = self._labels(batch, drop=False)
        for name, unet in (("loss", self.unet), ("loss_ema", self.ema_unet)):
            generator.manual_seed(batch_idx)
            loss = self.denoising_loss(unet, batch["image"], labels, generator)
            self.log(f"val/{name}", loss, prog_bar=name == "loss_ema", sync_dist=True)

    @override
    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(
            self.unet.parameters(),
            lr=self.hparams.lr,
            weight_decay=self.hparams.weight_decay,
            betas=tuple(self.hparams.betas),
        )
        warmup = max(1, self.hparams.warmup_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler,
                                                         "interval": "step"}}

    # ---- sampling and export ------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        num_images: int,
        seed: int = 0,
        labels: torch.Tensor | None = None,
        num_steps: int | None = None,
        guidance_scale: float | None = None,
        use_ema: bool = True,
        batch_size: int = 256,
    ) -> torch.Tensor:
        """DDIM samples in [-1, 1]; the same seed gives the same images on any device.

        For a conditional model ``labels`` defaults to ``0, 1, …, num_classes−1, 0, 1, …``.
        """
        unet = self.ema_unet if use_ema else self.unet
        if self.conditional and labels is None:
            labels = torch.arange(num_images) % self.hparams.num_classes
        noise = seeded_noise(num_images, self.sample_shape, seed, self.device)
        return sample_in_batches(
            unet, self.scheduler.config, noise, num_steps or self.hparams.sample_steps,
            labels=labels, null_label=self.null_label, batch_size=batch_size,
            guidance_scale=self.hparams.guidance_scale if guidance_scale is None
            else guidance_scale,
        )

    def save_pretrained(self, path: str | os.PathLike, use_ema: bool = True,
                        card: ExportCard | None = None) -> None:
        """Write a diffusers directory (``unet/``, ``scheduler/``, a README card: ``card``
        or ``model_card()``) atomically.

        It loads with ``DiffusionModule.from_pretrained`` and with diffusers'
        ``DDPMPipeline.from_pretrained`` (unconditional models).
        """
        save_pretrained(self.ema_unet if use_ema else self.unet, self.scheduler, path,
                        card or self.model_card(where=str(path)))

    def model_card(self, forget_set: str | None = None, evaluation: dict | None = None,
                   picture: str | os.PathLike | None = None, where: str = "path/to/this/folder"
                   ) -> ExportCard:
        """The README card of this model's export (see ``vdu_lightning.model_card``)."""
        return model_card(type(self).__name__, "DDPMPipeline", self.hparams,
                          self.hparams.get("pretrained"), forget_set, evaluation, picture, where)
