"""Gradient ascent: the plasticity term alone (VDU with γ = 0)."""

from __future__ import annotations

from typing import Any

import torch

from vdu_lightning.modules.unlearning import UnlearningModule


class GradientAscentModule(UnlearningModule):
    """Raise the denoising error on the forget set, with nothing holding the weights.

    The baseline that shows what VDU's stability term is for: without it the error grows
    without bound and the whole model degrades, so only the step budget (or
    ``target_forget_loss``) stops it. Arguments: ``UnlearningModule``'s.

    Example:
        >>> module = GradientAscentModule("runs/mnist5k/ddpm", lr=1e-4)  # doctest: +SKIP
    """

    def objective(self, batch: Any) -> dict[str, torch.Tensor]:
        plasticity = self.plasticity_loss(self.split_batch(batch)[0])
        return {"plasticity": plasticity, "loss": plasticity}
