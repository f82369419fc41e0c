"""``UnlearningModule``: what VDU and its peer methods share.

The pre-trained network and its scheduler, the noising of a batch, the forget and retain
denoising errors logged at validation, the optimizer over the parameters that move, a step
budget with an optional target forget error, sampling from the unlearned or the original
network with the same noise, and export as a diffusers directory. A method only says what it
minimises (``objective``) and what moves (``unlearning_parameters``), so every method runs
on the same data, budget and metrics.
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from diffusers import DDPMScheduler
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from vdu_lightning.checkpoints import WEIGHT_PREFIXES, load_diffusion_model
from vdu_lightning.diffusion import (
    noised,
    predict_noise,
    sample_in_batches,
    sample_shape,
    save_pretrained,
    seeded_noise,
)
from vdu_lightning.losses import (
    REDUCTIONS,
    TIMESTEP_WEIGHTINGS,
    check_choice,
    denoising_error,
    timestep_weights,
)
from vdu_lightning.modules.frozen import FrozenNetworks
from vdu_lightning.modules.compat import check_data_fits_model, check_precision
from vdu_lightning.modules.noise import NoiseStreams, NoiseStreamsHooks
from vdu_lightning.model_card import ExportCard, model_card

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


class UnlearningModule(NoiseStreamsHooks, pl.LightningModule, ABC):
    """Base of every unlearning method: subclass it and define ``objective``.

    ``training_step`` calls ``objective(batch)``, which returns the named loss terms with the
    total under ``"loss"``; every term is logged as ``train/<name>`` and kept (detached) in
    ``loss_terms`` for callbacks such as ``UnlearningGuard``. A batch is the forget batch, or
    ``{"forget": ..., "retain": ...}`` when the datamodule has a retain set.

    Args:
        pretrained: the model to unlearn: a diffusers directory, its Hub ID
            (``owner/name[@revision]``, see ``vdu_lightning.hub``) or a ``DiffusionModule``
            checkpoint. It must stay readable: the original network is read from it again.
        weights: ``ema`` or ``raw`` weights of a ``DiffusionModule`` checkpoint.
        optimizer: ``adam``, ``adamw`` or ``sgd``; ``lr``, ``weight_decay``, ``betas`` (Adam).
        timestep_weighting: C_t of the denoising error, ``simple`` (1) or ``elbo``.
        reduction: ``mean`` (per-entry averages) or ``sum`` (as written in docs/method.md §2).
        target_forget_loss: stop once the validation forget-set error reaches this.
        sample_steps: DDIM steps of ``sample``.

    Each argument is kept as an attribute of the same name (``self.lr``, ``self.reduction``,
    ...), and that is what the module reads, not ``hparams``: under LightningCLI ``hparams``
    holds only the arguments of the class the config names, so a subclass with its own
    ``__init__`` need not forward every argument of this one.
    """

    #: Whether the method needs nothing but the forget set (tables mark the ones that
    #: also need the retain data D_r).
    data_constrained: bool = True

    def __init__(
        self,
        pretrained: str,
        weights: str = "ema",
        optimizer: str = "adam",
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        timestep_weighting: str = "simple",
        reduction: str = "mean",
        target_forget_loss: float | None = None,
        sample_steps: int = 50,
    ) -> None:
        super().__init__()
        check_choice("weights", weights, list(WEIGHT_PREFIXES))
        check_choice("optimizer", optimizer, list(OPTIMIZERS))
        check_choice("timestep_weighting", timestep_weighting, TIMESTEP_WEIGHTINGS)
        check_choice("reduction", reduction, REDUCTIONS)
        if not 0.0 < lr < math.inf:
            raise ValueError(f"lr must be a positive, finite learning rate, got {lr!r}")
        # Collects the arguments of every subclass's __init__ too.
        self.save_hyperparameters()
        self.pretrained, self.weights, self.optimizer = pretrained, weights, optimizer
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        self.timestep_weighting, self.reduction = timestep_weighting, reduction
        self.target_forget_loss, self.sample_steps = target_forget_loss, sample_steps
        self.frozen = FrozenNetworks()
        self.unet, self.scheduler, self.num_classes = self.load_model()
        # diffusers loads models in eval mode, and Lightning keeps the mode it finds.
        self.unet.train()
        self.weight_per_timestep = timestep_weights(
            self.scheduler.betas, timestep_weighting, self.scheduler.config.variance_type)
        self.noise = NoiseStreams()
        self.loss_terms: dict[str, torch.Tensor] = {}

    # ---- hooks a subclass may override ------------------------------------------------------
    def load_model(self) -> tuple[nn.Module, DDPMScheduler, int | None]:
        """The network to unlearn, its noise scheduler and its number of labels (None:
        unconditional), from ``pretrained``."""
        return load_diffusion_model(self.pretrained, self.weights)

    def unlearning_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """What moves (default: every parameter of the network); the rest is frozen."""
        yield from self.unet.named_parameters()

    @abstractmethod
    def objective(self, batch: Any) -> dict[str, torch.Tensor]:
        """The named terms of the loss, the total under ``"loss"``."""

    # ---- loss terms the methods compose --------------------------------------------------------
    def denoising_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The C_t-weighted error Σ_t C_t ‖ε − ε_θ(x_t, t[, c])‖² on a batch (t ~ U, ε ~ N)."""
        predicted, noise, t = self._predict_noise_of(batch, self.noise.generator)
        weights = self.weight_per_timestep.to(noise.device)[t]
        return denoising_error(predicted, noise, weights, self.reduction)

    def plasticity_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """P(θ): minus the denoising error on a forget batch (gradient ascent on it)."""
        return -self.denoising_loss(batch)

    def noised(self, images: torch.Tensor, generator: torch.Generator | None,
               timesteps: tuple[int, int] | None = None) -> tuple[torch.Tensor, ...]:
        """(x_t, ε, t) for images noised at t ~ U{lo..hi−1} with ε ~ N(0, I); ``timesteps``
        is the band (lo, hi), all of 0..T−1 by default."""
        return noised(self.scheduler, images, generator, timesteps)

    def _predict_noise_of(self, batch: dict[str, torch.Tensor],
                          generator: torch.Generator | None) -> tuple[torch.Tensor, ...]:
        """(ε_θ(x_t, t[, c]), ε, t) for a batch noised by ``noised``."""
        x_t, noise, t = self.noised(batch["image"], generator)
        labels = batch["label"] if self.conditional else None
        return predict_noise(self.unet, x_t, t, labels), noise, t

    @staticmethod
    def split_batch(batch: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """(forget batch, retain batch or None) of a training batch."""
        if "forget" in batch:
            return batch["forget"], batch.get("retain")
        return batch, None

    def retain_part(self, batch: Any) -> dict[str, torch.Tensor]:
        """The retain batch, or an error saying how to get one."""
        retain = self.split_batch(batch)[1]
        if retain is None:
            raise ValueError(f"{type(self).__name__} trains on retain data: give "
                             "ForgetSetDataModule a retain_size > 0")
        return retain

    # ---- training -------------------------------------------------------------------------
    @property
    def conditional(self) -> bool:
        return self.num_classes is not None

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return sample_shape(self.unet)

    @override
    def setup(self, stage: str) -> None:
        if self._trainer is None:
            return
        check_precision(self.trainer, type(self).__name__)
        if self.trainer.datamodule is not None:
            check_data_fits_model(self.trainer.datamodule, self.sample_shape, "the UNet")
        # Here, before DDP wraps the module: it all-reduces what requires a gradient then.
        self.freeze_fixed_parameters()

    def freeze_fixed_parameters(self) -> None:
        """Only what ``unlearning_parameters()`` yields requires a gradient: backward (the
        stability term's too) computes none for the rest, and DDP all-reduces none."""
        moving = {id(parameter) for _, parameter in self.unlearning_parameters()}
        for parameter in self.parameters():
            parameter.requires_grad_(id(parameter) in moving)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        terms = self.objective(batch)
        self.loss_terms = {name: value.detach() for name, value in terms.items()}
        for name, value in terms.items():
            self.log(f"train/{name}", value, prog_bar=name == "plasticity")
        return terms["loss"]

    def _evaluation_step(self, stage: str, batch: dict[str, torch.Tensor], batch_idx: int,
                         dataloader_idx: int) -> None:
        # The same noise and timesteps for a batch at every evaluation: comparable curves.
        generator = torch.Generator(self.device).manual_seed(batch_idx)
        predicted, noise, _ = self._predict_noise_of(batch, generator)
        part = ("forget", "retain")[dataloader_idx] if dataloader_idx < 2 else str(dataloader_idx)
        self.log(f"{stage}/{part}_loss", denoising_error(predicted, noise), sync_dist=True,
                 add_dataloader_idx=False, prog_bar=part == "forget")

    @override
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int,
                        dataloader_idx: int = 0) -> None:
        self._evaluation_step("val", batch, batch_idx, dataloader_idx)

    @override
    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int,
                  dataloader_idx: int = 0) -> None:
        self._evaluation_step("test", batch, batch_idx, dataloader_idx)

    @override
    def on_validation_epoch_end(self) -> None:
        target = self.target_forget_loss
        if target is None or self.trainer.sanity_checking or self.trainer.state.fn != "fit":
            return
        error = self.trainer.callback_metrics.get("val/forget_loss")
        reached = error is not None and float(error) >= target
        if self.trainer.strategy.reduce_boolean_decision(reached, all=False):
            rank_zero_info(f"forget-set error {float(error):.4f} reached target_forget_loss="
                           f"{target} at step {self.global_step}: stopping")
            self.trainer.should_stop = True

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        parameters = [p for _, p in self.unlearning_parameters()]
        if not parameters:
            raise ValueError("no parameter to unlearn: unlearning_parameters() is empty")
        kwargs: dict[str, Any] = {"lr": self.lr, "weight_decay": self.weight_decay}
        if self.optimizer != "sgd":
            kwargs["betas"] = self.betas
        return OPTIMIZERS[self.optimizer](parameters, **kwargs)

    # ---- sampling and export --------------------------------------------------------------
    @property
    def original_unet(self) -> nn.Module:
        """The pre-trained network, read again from ``pretrained`` on first use (frozen, out
        of the module's children: ``FrozenNetworks``)."""
        return self.frozen.get("original", self.device, load=lambda: self.load_model()[0])

    @torch.no_grad()
    def sample_from(self, noise: torch.Tensor, original: bool = False,
                    num_steps: int | None = None, labels: torch.Tensor | None = None,
                    batch_size: int = 256) -> torch.Tensor:
        """DDIM images in [-1, 1] from ``noise``, by the unlearned model or the original one.

        For a conditional model ``labels`` defaults to ``0, 1, …, num_classes−1, 0, 1, …``.
        """
        if self.conditional and labels is None:
            labels = torch.arange(noise.shape[0]) % self.num_classes
        unet = self.original_unet if original else self.unet
        return sample_in_batches(unet, self.scheduler.config, noise.to(self.device),
                                 num_steps or self.sample_steps, labels=labels,
                                 batch_size=batch_size)

    def sample(self, num_images: int, seed: int = 0, **kwargs: Any) -> torch.Tensor:
        """``sample_from`` seeded noise: the same seed gives the same images on any device."""
        return self.sample_from(seeded_noise(num_images, self.sample_shape, seed, self.device),
                                **kwargs)

    def save_pretrained(self, path: str | os.PathLike, card: ExportCard | None = None) -> None:
        """Write the unlearned model as a diffusers directory with a README card (``card``
        or ``model_card()``), atomically."""
        save_pretrained(self.unet, self.scheduler, path,
                        card or self.model_card(where=str(path)))

    def model_card(self, forget_set: str | None = None, evaluation: dict | None = None,
                   picture: str | os.PathLike | None = None, where: str = "path/to/this/folder"
                   ) -> ExportCard:
        """The README card of this model's export (see ``vdu_lightning.model_card``)."""
        return model_card(type(self).__name__, "DDPMPipeline", self.hparams,
                          self.pretrained, forget_set, evaluation, picture, where)
