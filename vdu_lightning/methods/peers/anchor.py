"""Isotropic anchor: VDU with one constant variance, i.e. plain L2 to the pre-trained θ*."""

from __future__ import annotations

from typing import Any

import torch
from typing_extensions import override

from vdu_lightning.methods.vdu.module import VDUModule
from vdu_lightning.prior import ParameterPrior


class IsotropicAnchorModule(VDUModule):
    """γ·Σ(θ − θ*)²/(2σ²) + (1 − γ)·P: the stability term without the checkpoint prior.

    The ablation that asks whether the checkpoints' per-parameter variances matter: every
    weight is held with the same strength 1/σ². The prior (θ*, σ²) is made at the start of
    fit from the weights being unlearned and travels in checkpoints like VDU's. It is VDU
    with another prior, so it stays a ``VDUModule``: every VDU option applies to it alike,
    and an ablation compares like with like.

    Args:
        pretrained, gamma: as ``VDUModule``.
        variance: σ², the one variance of every weight. To compare with a checkpoint prior at
            the same overall strength, use that prior's harmonic mean variance
            (1 / mean(1/σ*²)).

    Example:
        >>> module = IsotropicAnchorModule("runs/mnist5k/ddpm", variance=1e-5)  # doctest: +SKIP
    """

    def __init__(self, pretrained: str, gamma: float = 0.5, variance: float = 1e-5,
                 **kwargs: Any) -> None:
        if not variance > 0:
            raise ValueError(f"variance must be positive, got {variance!r}")
        super().__init__(pretrained, gamma=gamma, **kwargs)

    @override
    def on_fit_start(self) -> None:
        if self.prior is None:  # a resumed run restored θ* from its checkpoint
            mean = {n: p.detach().float().clone() for n, p in self.unet.named_parameters()}
            var = {n: torch.full_like(m, self.hparams.variance) for n, m in mean.items()}
            self.set_prior(ParameterPrior(mean, var, count=1, source="isotropic",
                                          min_var=self.hparams.variance))
        super().on_fit_start()
