"""``ExportPretrained``: write the trained model as a standalone directory at the end of fit."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn

from vdu_lightning.files import check_directory_writable
from vdu_lightning.modules.compat import refuse_sharded_weights


class ExportPretrained(pl.Callback):
    """Call the module's ``save_pretrained(dirpath)`` on global rank 0 when fit ends, if the
    model was trained at all (``global_step`` > 0; otherwise it warns and writes nothing).

    ``DiffusionModule`` writes a diffusers directory, ``ClassifierModule`` a safetensors one;
    both are written atomically, so an interrupted export leaves any earlier export intact.

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: vdu_lightning.callbacks.ExportPretrained
              init_args: {dirpath: runs/mnist5k/ddpm}
    """

    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not callable(getattr(pl_module, "save_pretrained", None)):
            raise TypeError(f"ExportPretrained needs a module with save_pretrained(); "
                            f"{type(pl_module).__name__} has none")
        refuse_sharded_weights(trainer, "ExportPretrained")
        if stage == "fit":
            # The export comes last: a directory it cannot write must stop fit before training.
            check_directory_writable(self.dirpath, "ExportPretrained dirpath")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step == 0:
            # Nothing was trained, in this run or a run it resumed (e.g. max_steps=0): an
            # export would replace an earlier one with the weights the run started from.
            rank_zero_warn(f"ExportPretrained: no training step was taken (trainer.max_steps="
                           f"{trainer.max_steps}): nothing was exported, and {self.dirpath} "
                           "keeps what it held")
            return
        if trainer.is_global_zero:
            pl_module.save_pretrained(self.dirpath)
