"""``UnlearningGuard``: stop an unlearning run at the first NaN or inf, before it does harm."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from typing_extensions import override


class NonFiniteLossError(FloatingPointError):
    """An unlearning loss term or gradient became NaN or inf."""


class UnlearningGuard(pl.Callback):
    """Raise ``NonFiniteLossError`` when a loss term or the gradient is not finite.

    The check runs after backward and before the optimizer step, so the step that would
    have written NaN into the weights is never taken, and no checkpoint is written after it:
    the last checkpoint on disk is the last good one. The message names the step and the
    term (from the module's ``loss_terms``, e.g. ``stability``, ``plasticity``).

    Gradients are all-reduced across DDP ranks before this hook, so every rank reaches the
    same decision and all stop together. Under ``16-mixed`` the gradient scaler skips
    steps with inf gradients by design: only the loss terms are checked then.

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: vdu_lightning.callbacks.UnlearningGuard
    """

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        terms = getattr(pl_module, "loss_terms", {})
        bad = [f"{name} = {value.item()}" for name, value in terms.items()
               if not torch.isfinite(value).all()]
        if not bad and getattr(trainer.precision_plugin, "scaler", None) is None:
            grads = [p.grad for group in optimizer.param_groups for p in group["params"]
                     if p.grad is not None]
            if grads and not torch.isfinite(torch.stack(torch._foreach_norm(grads))).all():
                bad = ["the gradient (NaN or inf, on this process or another)"]
        if bad:
            raise NonFiniteLossError(
                f"unlearning stopped at step {trainer.global_step}: {'; '.join(bad)}. The "
                "optimizer step was not taken and no checkpoint was written after it, so the "
                "last saved checkpoint holds the last good weights. Lower the learning rate "
                "or raise gamma."
            )
