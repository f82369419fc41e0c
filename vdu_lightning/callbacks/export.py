"""``ExportPretrained``: write the trained model as a standalone directory at the end of fit."""

from __future__ import annotations

import inspect
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from vdu_lightning.callbacks.evaluation import EvaluationCallback, json_plain
from vdu_lightning.files import check_directory_writable
from vdu_lightning.hub import push_folder
from vdu_lightning.model_card import ExportCard, describe_forget_set
from vdu_lightning.modules.compat import refuse_sharded_weights


class ExportPretrained(pl.Callback):
    """Call the module's ``save_pretrained(dirpath)`` on global rank 0 when fit ends, if the
    model was trained at all (``global_step`` > 0; otherwise it warns and writes nothing).

    ``DiffusionModule`` writes a diffusers directory, ``ClassifierModule`` a safetensors one;
    both are written atomically, so an interrupted export leaves any earlier export intact.
    A module with ``model_card`` (every diffusion module) also gets a README model card: its
    method and hyperparameters, the datamodule's forget set, and the latest results and
    before/after grid of an evaluation callback of the run (``vdu validate`` numbers need a
    validation during fit, e.g. ``check_val_every_n_epoch``), ready to publish on the Hub.
    With ``push_to_hub: owner/name`` rank 0 then uploads the folder to that model repository
    (created private unless ``hub_private: false``; needs a network and a Hub token). A
    failed upload warns and leaves the export in place.

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: vdu_lightning.callbacks.ExportPretrained
              init_args: {dirpath: runs/mnist5k/ddpm}
    """

    def __init__(self, dirpath: str, push_to_hub: str | None = None,
                 hub_private: bool = True) -> None:
        self.dirpath = dirpath
        self.push_to_hub = push_to_hub
        self.hub_private = hub_private

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not callable(getattr(pl_module, "save_pretrained", None)):
            raise TypeError(f"ExportPretrained needs a module with save_pretrained(); "
                            f"{type(pl_module).__name__} has none")
        refuse_sharded_weights(trainer, "ExportPretrained")
        if stage == "fit":
            # The export comes last: a directory it cannot write must stop fit before training.
            check_directory_writable(self.dirpath, "ExportPretrained dirpath")

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step == 0:
            # Nothing was trained, in this run or a run it resumed (e.g. max_steps=0): an
            # export would replace an earlier one with the weights the run started from.
            rank_zero_warn(f"ExportPretrained: no training step was taken (trainer.max_steps="
                           f"{trainer.max_steps}): nothing was exported, and {self.dirpath} "
                           "keeps what it held")
            return
        if not trainer.is_global_zero:
            return
        # A user's save_pretrained(path) override without ``card`` still exports.
        if (callable(getattr(pl_module, "model_card", None))
                and "card" in inspect.signature(pl_module.save_pretrained).parameters):
            pl_module.save_pretrained(self.dirpath, card=self.card(trainer, pl_module))
        else:  # e.g. ClassifierModule: an evaluator, not a model to publish
            pl_module.save_pretrained(self.dirpath)
        if self.push_to_hub:
            try:
                url = push_folder(self.dirpath, self.push_to_hub, self.hub_private)
            except Exception as err:  # the export is on disk whatever the network does
                rank_zero_warn(f"ExportPretrained: {self.dirpath} was written, but pushing it "
                               f"to {self.push_to_hub} failed: {err}")
            else:
                rank_zero_info(f"ExportPretrained: pushed {self.dirpath} to {url}")

    def card(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> ExportCard:
        """The export's README card: the module's method and hyperparameters, the
        datamodule's forget set, and the run's latest evaluation with its before/after grid."""
        evaluations = [c for c in trainer.callbacks
                       if isinstance(c, EvaluationCallback) and c.results]
        latest = max(evaluations, key=lambda c: c.results.get("step", -1), default=None)
        picture = None if latest is None else latest.picture
        return pl_module.model_card(
            forget_set=describe_forget_set(trainer.datamodule),
            evaluation=None if latest is None else json_plain(latest.results),
            picture=picture if picture is not None and Path(picture).is_file() else None,
            where=self.push_to_hub or self.dirpath)
