"""Retain fine-tuning: plain denoising training on the retain data D_r."""

from __future__ import annotations

from typing import Any

import torch

from vdu_lightning.modules.unlearning import UnlearningModule


class RetainFinetuneModule(UnlearningModule):
    """Keep training the pre-trained model on D_r alone, so the forget set fades.

    Not data-constrained: it needs the retain data VDU does without (give
    ``ForgetSetDataModule`` a ``retain_size``); it is the reference VDU aims at without it.
    Arguments: ``UnlearningModule``'s.

    Example:
        >>> module = RetainFinetuneModule("runs/mnist5k/ddpm")  # doctest: +SKIP
    """

    data_constrained = False

    def objective(self, batch: Any) -> dict[str, torch.Tensor]:
        retain = self.denoising_loss(self.retain_part(batch))
        return {"retain": retain, "loss": retain}
