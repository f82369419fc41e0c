"""``VDUModule``: Variational Diffusion Unlearning (method.md §2) as a LightningModule."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from vdu_lightning.losses import stability_penalty
from vdu_lightning.modules.unlearning import OPTIMIZERS, UnlearningModule
from vdu_lightning.prior import ParameterPrior

__all__ = ["OPTIMIZERS", "PRIOR_KEY", "VDUModule"]

#: The checkpoint key holding the prior: it travels with the run, outside the module's
#: buffers (DDP would re-send buffers before every forward pass).
PRIOR_KEY = "vdu_prior"


class VDUModule(UnlearningModule):
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
    ``unlearning_parameters()``, and ``load_model()`` (what network to unlearn). The other
    arguments are ``UnlearningModule``'s.

    Args:
        pretrained: the model to unlearn: a diffusers directory (e.g. ``ExportPretrained``'s
            output) or a ``DiffusionModule`` checkpoint. It must stay readable: loading a
            VDU checkpoint rebuilds the architecture from it.
        gamma: γ in (0, 1), the weight of the stability term.

    Example:
        >>> module = VDUModule("runs/mnist5k/ddpm", gamma=0.5)  # doctest: +SKIP
        >>> prior = ParameterPrior.load("prior_trajectory.safetensors")  # doctest: +SKIP
        >>> module.set_prior(prior)  # doctest: +SKIP
    """

    def __init__(self, pretrained: str, gamma: float = 0.5, **kwargs: Any) -> None:
        if not 0.0 < gamma < 1.0:
            raise ValueError(f"gamma must be in (0, 1), got {gamma!r}: 0 is plain gradient "
                             "ascent (GradientAscentModule), 1 never forgets")
        super().__init__(pretrained, **kwargs)
        self.prior: ParameterPrior | None = None
        self._prior_cache: tuple[Any, ...] | None = None

    # ---- hooks a subclass may override ------------------------------------------------------
    def unlearning_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """What moves: the parameters the prior covers (all, before a prior is set)."""
        for name, parameter in self.unet.named_parameters():
            if self.prior is None or name in self.prior.mean:
                yield name, parameter

    def stability_loss(self) -> torch.Tensor:
        """S(θ) = Σ (θ − μ*)² / (2σ*²) (÷ entries for ``mean``), in fp32, one fused pass."""
        params, means, inv_stds = self._prior_tensors()
        return stability_penalty(params, means, inv_stds, self.hparams.reduction)

    def objective(self, batch: Any) -> dict[str, torch.Tensor]:
        """γ·S + (1 − γ)·P; only the forget part of a batch is used (VDU needs no D_r)."""
        forget = self.split_batch(batch)[0]
        stability = self.stability_loss()
        plasticity = self.plasticity_loss(forget)
        gamma = self.hparams.gamma
        loss = gamma * stability + (1.0 - gamma) * plasticity
        return {"stability": stability, "plasticity": plasticity, "loss": loss}

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
        if self.prior is None:
            raise RuntimeError(f"{type(self).__name__} has no prior: add the CheckpointPrior "
                               "callback or call set_prior() before fit")
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

    def on_fit_start(self) -> None:
        if self.prior is None and type(self).stability_loss is VDUModule.stability_loss:
            raise RuntimeError(f"{type(self).__name__} has no prior: add the CheckpointPrior "
                               "callback (trainer.callbacks) or call set_prior() before fit")

    # ---- checkpoints ----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.prior is not None:
            checkpoint[PRIOR_KEY] = self.prior.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if PRIOR_KEY in checkpoint:
            self.set_prior(ParameterPrior.from_state_dict(checkpoint[PRIOR_KEY]))
