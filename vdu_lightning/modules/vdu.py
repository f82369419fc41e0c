"""``VDUModule``: Variational Diffusion Unlearning (method.md §2) as a LightningModule."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from diffusers import DDPMScheduler
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from vdu_lightning.checkpoints import WEIGHT_PREFIXES, load_diffusion_model
from vdu_lightning.diffusion import (
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
    stability_penalty,
    timestep_weights,
)
from vdu_lightning.modules.compat import check_data_fits_model
from vdu_lightning.modules.noise import NoiseStreams
from vdu_lightning.prior import ParameterPrior

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
#: The checkpoint key holding the prior: it travels with the run, outside the module's
#: buffers (DDP would re-send buffers before every forward pass).
PRIOR_KEY = "vdu_prior"


class VDUModule(pl.LightningModule):
    """Unlearn a forget set from a pre-trained DDPM: L = γ·S(θ) + (1 − γ)·P(θ).

    S is the stability regularizer, the quadratic of the checkpoint prior N(μ*, diag σ*²)
    (given by the ``CheckpointPrior`` callback or ``set_prior``); P, the plasticity inducer,
    is minus the C_t-weighted denoising error on the forget set, so minimising L raises that
    error while S holds the weights near the pre-trained ones. θ starts at the pre-trained
    weights; only the parameters the prior covers move.

    **Reduction** (``reduction``). ``mean`` (default) divides S by the number of parameters
    the prior covers and takes P as the mean over the batch and pixels; both terms are then
    averages of per-entry quantities whose size does not depend on the number of parameters,
    the image size or the batch size, so a γ tuned on one model carries over to a larger one.
    ``sum`` uses the terms exactly as written in the method (S summed over parameters, P
    summed over pixels and the batch), the form in which γ = ½ gives the Bayesian posterior.

    **Stopping.** P has no lower bound: give the trainer a step budget (``max_steps``),
    optionally a ``target_forget_loss`` (fit stops at the first validation whose forget-set
    denoising error reaches it), and add ``UnlearningGuard`` to stop on NaN/inf.

    Hooks a subclass may override: ``plasticity_loss(batch)``, ``stability_loss()``,
    ``unlearning_parameters()``, and ``load_model()`` (what network to unlearn).

    Args:
        pretrained: the model to unlearn: a diffusers directory (e.g. ``ExportPretrained``'s
            output) or a ``DiffusionModule`` checkpoint. It must stay readable: loading a
            VDU checkpoint rebuilds the architecture from it.
        weights: ``ema`` or ``raw`` weights of a ``DiffusionModule`` checkpoint.
        gamma: γ in (0, 1), the weight of the stability term.
        optimizer: ``adam``, ``adamw`` or ``sgd``; ``lr``, ``weight_decay``, ``betas`` (Adam).
        timestep_weighting: C_t, ``simple`` (1) or ``elbo`` (normalised to mean 1).
        reduction: ``mean`` or ``sum``, see above.
        target_forget_loss: stop once the validation forget-set error reaches this.
        sample_steps: DDIM steps of ``sample``.

    Example:
        >>> module = VDUModule("runs/mnist5k/ddpm", gamma=0.5)  # doctest: +SKIP
        >>> prior = ParameterPrior.load("prior_trajectory.safetensors")  # doctest: +SKIP
        >>> module.set_prior(prior)  # doctest: +SKIP
    """

    def __init__(
        self,
        pretrained: str,
        weights: str = "ema",
        gamma: float = 0.5,
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
        if not 0.0 < gamma < 1.0:
            raise ValueError(f"gamma must be in (0, 1), got {gamma!r}: 0 is plain gradient "
                             "ascent (no stability term), 1 never forgets")
        check_choice("weights", weights, list(WEIGHT_PREFIXES))
        check_choice("optimizer", optimizer, list(OPTIMIZERS))
        check_choice("timestep_weighting", timestep_weighting, TIMESTEP_WEIGHTINGS)
        check_choice("reduction", reduction, REDUCTIONS)
        self.save_hyperparameters()
        self.unet, self.scheduler, self.num_classes = self.load_model()
        # diffusers loads models in eval mode, and Lightning keeps the mode it finds.
        self.unet.train()
        self.weight_per_timestep = timestep_weights(
            self.scheduler.betas, timestep_weighting, self.scheduler.config.variance_type)
        self.prior: ParameterPrior | None = None
        self._prior_cache: tuple[Any, ...] | None = None
        self.noise = NoiseStreams()
        self.loss_terms: dict[str, torch.Tensor] = {}

    # ---- hooks a subclass may override ------------------------------------------------------
    def load_model(self) -> tuple[nn.Module, DDPMScheduler, int | None]:
        """The network to unlearn, its noise scheduler and its number of labels (None:
        unconditional), from ``hparams.pretrained``."""
        return load_diffusion_model(self.hparams.pretrained, self.hparams.weights)

    def unlearning_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """What moves: the parameters the prior covers (all, before a prior is set)."""
        for name, parameter in self.unet.named_parameters():
            if self.prior is None or name in self.prior.mean:
                yield name, parameter

    def stability_loss(self) -> torch.Tensor:
        """S(θ) = Σ (θ − μ*)² / (2σ*²) (÷ entries for ``mean``), in fp32, one fused pass."""
        if self.prior is None:
            raise RuntimeError("VDUModule has no prior: add the CheckpointPrior callback or "
                               "call set_prior() before fit")
        params, means, inv_stds = self._prior_tensors()
        return stability_penalty(params, means, inv_stds, self.hparams.reduction)

    def plasticity_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """P(θ) = −Σ_t C_t ‖ε − ε_θ(x_t, t[, c])‖² on a forget batch (t ~ U, ε ~ N(0, I))."""
        predicted, noise, t = self._predict_noise_of(batch, self.noise.generator)
        weights = self.weight_per_timestep.to(noise.device)[t]
        return -denoising_error(predicted, noise, weights, self.hparams.reduction)

    def _predict_noise_of(self, batch: dict[str, torch.Tensor],
                          generator: torch.Generator | None) -> tuple[torch.Tensor, ...]:
        """(ε_θ(x_t, t[, c]), ε, t) for a batch noised at t ~ U{0..T−1}, ε ~ N(0, I)."""
        images = batch["image"]
        t = torch.randint(0, len(self.weight_per_timestep), (images.shape[0],),
                          device=images.device, generator=generator)
        noise = torch.randn(images.shape, device=images.device, generator=generator,
                            dtype=images.dtype)
        labels = batch["label"] if self.conditional else None
        x_t = self.scheduler.add_noise(images, noise, t)
        return predict_noise(self.unet, x_t, t, labels), noise, t

    # ---- the prior ------------------------------------------------------------------------
    def set_prior(self, prior: ParameterPrior) -> None:
        """Use ``prior`` (refused if it does not match the network); parameters it does not
        cover are frozen."""
        prior.check_matches(self.unet.named_parameters(), "the model being unlearned")
        self.prior = prior
        self._prior_cache = None
        for name, parameter in self.unet.named_parameters():
            parameter.requires_grad_(name in prior.mean)

    def _prior_tensors(self) -> tuple[list[torch.Tensor], ...]:
        """Parameters, μ* and 1/σ* aligned, on the parameters' device (cached)."""
        device = next(self.unet.parameters()).device
        if self._prior_cache is None or self._prior_cache[0] != device:
            prior = self.prior.to(device)
            parameters = dict(self.unet.named_parameters())
            self._prior_cache = (
                device,
                [parameters[n] for n in prior.names],
                [prior.mean[n] for n in prior.names],
                [prior.var[n].rsqrt() for n in prior.names],
            )
        return self._prior_cache[1:]

    # ---- training -------------------------------------------------------------------------
    @property
    def conditional(self) -> bool:
        return self.num_classes is not None

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return sample_shape(self.unet)

    def setup(self, stage: str) -> None:
        if self._trainer is not None and self.trainer.datamodule is not None:
            check_data_fits_model(self.trainer.datamodule, self.sample_shape, "the UNet")

    def on_fit_start(self) -> None:
        if self.prior is None and type(self).stability_loss is VDUModule.stability_loss:
            raise RuntimeError("VDUModule has no prior: add the CheckpointPrior callback "
                               "(trainer.callbacks) or call set_prior() before fit")

    def on_train_start(self) -> None:
        self.noise.start(self)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        # With a retain set the datamodule yields {"forget": ..., "retain": ...}; VDU uses
        # only the forget part (the retain set is for the peer methods that need it).
        forget = batch["forget"] if "forget" in batch else batch
        stability = self.stability_loss()
        plasticity = self.plasticity_loss(forget)
        gamma = self.hparams.gamma
        loss = gamma * stability + (1.0 - gamma) * plasticity
        self.loss_terms = {"stability": stability.detach(), "plasticity": plasticity.detach(),
                           "loss": loss.detach()}
        self.log("train/stability", stability)
        self.log("train/plasticity", plasticity, prog_bar=True)
        self.log("train/loss", loss)
        return loss

    def _evaluation_step(self, stage: str, batch: dict[str, torch.Tensor], batch_idx: int,
                         dataloader_idx: int) -> None:
        # The same noise and timesteps for a batch at every evaluation: comparable curves.
        generator = torch.Generator(self.device).manual_seed(batch_idx)
        predicted, noise, _ = self._predict_noise_of(batch, generator)
        part = ("forget", "retain")[dataloader_idx] if dataloader_idx < 2 else str(dataloader_idx)
        self.log(f"{stage}/{part}_loss", denoising_error(predicted, noise), sync_dist=True,
                 add_dataloader_idx=False, prog_bar=part == "forget")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int,
                        dataloader_idx: int = 0) -> None:
        self._evaluation_step("val", batch, batch_idx, dataloader_idx)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int,
                  dataloader_idx: int = 0) -> None:
        self._evaluation_step("test", batch, batch_idx, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        target = self.hparams.target_forget_loss
        if target is None or self.trainer.sanity_checking or self.trainer.state.fn != "fit":
            return
        error = self.trainer.callback_metrics.get("val/forget_loss")
        reached = error is not None and float(error) >= target
        if self.trainer.strategy.reduce_boolean_decision(reached, all=False):
            rank_zero_info(f"forget-set error {float(error):.4f} reached target_forget_loss="
                           f"{target} at step {self.global_step}: stopping")
            self.trainer.should_stop = True

    def configure_optimizers(self) -> torch.optim.Optimizer:
        parameters = [p for _, p in self.unlearning_parameters()]
        if not parameters:
            raise ValueError("no parameter to unlearn: unlearning_parameters() is empty")
        hp = self.hparams
        kwargs: dict[str, Any] = {"lr": hp.lr, "weight_decay": hp.weight_decay}
        if hp.optimizer != "sgd":
            kwargs["betas"] = tuple(hp.betas)
        return OPTIMIZERS[hp.optimizer](parameters, **kwargs)

    # ---- checkpoints ----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.noise.save(self, checkpoint)
        if self.prior is not None:
            checkpoint[PRIOR_KEY] = self.prior.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.noise.load(checkpoint)
        if PRIOR_KEY in checkpoint:
            self.set_prior(ParameterPrior.from_state_dict(checkpoint[PRIOR_KEY]))

    # ---- sampling and export --------------------------------------------------------------
    @property
    def original_unet(self) -> nn.Module:
        """The pre-trained network, read again from ``pretrained`` on first use (kept out of
        the module's children: not trained, not checkpointed, not synchronised by DDP)."""
        if "_original_unet" not in self.__dict__:
            unet = self.load_model()[0].requires_grad_(False).eval()
            self.__dict__["_original_unet"] = unet
        return self.__dict__["_original_unet"].to(self.device)

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
                                 num_steps or self.hparams.sample_steps, labels=labels,
                                 batch_size=batch_size)

    def sample(self, num_images: int, seed: int = 0, **kwargs: Any) -> torch.Tensor:
        """``sample_from`` seeded noise: the same seed gives the same images on any device."""
        return self.sample_from(seeded_noise(num_images, self.sample_shape, seed, self.device),
                                **kwargs)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the unlearned model as a diffusers directory (atomically)."""
        save_pretrained(self.unet, self.scheduler, path)
