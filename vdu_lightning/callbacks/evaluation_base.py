"""``EvaluationCallback``: what every evaluation callback shares (docs/method.md §4, §5).

An evaluation compares an original model with its unlearned copy on paired outputs. Whatever
the models make and however it is scored, the same machinery surrounds it, and lives here:
when the evaluation runs and where its files go; the original model's results, measured once
and kept (in memory, and on disk with ``cache_dir``); FID's real images and their statistics;
the gathering of the processes' shares under DDP; the evaluation classifiers; the u-FID ratio;
and the results JSON, the before/after picture and the logged values. A subclass says only
what it samples and how it scores it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from PIL import Image
from torch import Tensor
from typing_extensions import override

from vdu_lightning.callbacks.samples import save_grid
from vdu_lightning.evaluation import ClassifierNet, load_classifier
from vdu_lightning.evaluation.cache import OriginalCache
from vdu_lightning.evaluation.paired import u_fid_ratio
from vdu_lightning.files import atomic_file, atomic_write_text, check_directory_writable
from vdu_lightning.metrics import UnlearnedFID
from vdu_lightning.modules.compat import refuse_sharded_weights


def _positive(name: str, value: Any, least: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be an int >= {least}, got {value!r}")


def json_plain(value: Any) -> Any:
    """``value`` with every NaN or infinity, however deeply nested, made null: JSON has
    neither, and strict readers refuse the files that hold them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_plain(item) for item in value]
    return value


def u_fid_metrics(name: str, original: float, unlearned: float) -> dict[str, float]:
    """The logged u-FID values: ``<name>`` (the unlearned model's), ``original/<name>`` and
    ``u_fid_ratio`` (docs/method.md §4)."""
    return {name: unlearned, f"original/{name}": original,
            "u_fid_ratio": u_fid_ratio(original, unlearned)}


class EvaluationCallback(pl.Callback):
    """Runs an evaluation on ``vdu validate`` / ``vdu test`` (and during fit with
    ``during_fit``, never in the sanity check), writing into ``dirpath`` (default: the run's
    log directory, or one folder per W&B run).

    ``evaluate`` measures the original model (once: see ``_original_results``) and the
    unlearned one, compares them, logs every value as ``eval/<name>`` (the same on every
    rank), keeps the results in ``self.results`` and, on rank 0, writes
    ``evaluation_step_XXXXXXX.json`` and the pictures. A subclass defines:

    * ``_check_module(pl_module)`` and ``_check_run(trainer)``: every check before any
      sampling, on every rank (a rank that raised alone would leave the others waiting);
    * ``_load(trainer, pl_module)``: evaluators and reference images, once per module and
      world (``_setup_key``);
    * ``_measure(trainer, pl_module, original)``: one model's results, the same on every rank;
    * ``_compare(trainer, pl_module, original, unlearned)``: ``(metrics, details)``, the flat
      logged values and the rest of the results;
    * ``_write_pictures(trainer, out, results, original, unlearned)`` (rank 0);

    and may define ``_to_device``, ``_original_digest`` (when the in-memory original results
    go stale) and, with ``cache_dir``, ``_original_key``, ``_to_entry``, ``_from_entry``.

    Args:
        dirpath: where files go; default ``<trainer.log_dir>/evaluation``.
        during_fit: also evaluate at fit's validations.
        cache_dir: keep the original model's results here between runs.
    """

    def __init__(self, dirpath: str | None, during_fit: bool, cache_dir: str | None = None
                 ) -> None:
        self.dirpath = dirpath
        self.during_fit = during_fit
        self.cache_dir = cache_dir
        self.results: dict[str, Any] = {}
        #: The latest before/after PNG written (rank 0), shown by the exported model's card.
        self.picture: Path | None = None
        self._cache_key: tuple | None = None
        self._original: Any = None
        self._original_version: str | None = None
        self._out_dir: str | None = None

    # ---- what a subclass defines --------------------------------------------------------
    def _check_module(self, pl_module: pl.LightningModule) -> None:
        raise NotImplementedError

    def _check_run(self, trainer: pl.Trainer) -> None:
        raise NotImplementedError

    def _load(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        raise NotImplementedError

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                 original: bool) -> Any:
        raise NotImplementedError

    def _compare(self, trainer: pl.Trainer, pl_module: pl.LightningModule, original: Any,
                 unlearned: Any) -> tuple[dict[str, float], dict[str, Any]]:
        raise NotImplementedError

    def _write_pictures(self, trainer: pl.Trainer, out: Path, results: dict[str, Any],
                        original: Any, unlearned: Any) -> None:
        raise NotImplementedError

    def _to_device(self, device: torch.device) -> None:
        """Move the evaluators to the module's device."""

    def _setup_key(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple:
        """What the loaded evaluators and the original's results belong to."""
        return id(pl_module), trainer.world_size, trainer.global_rank

    def _original_digest(self, pl_module: pl.LightningModule) -> str | None:
        """Changes when the original network does (None: it cannot change within a setup)."""
        return None

    def _original_key(self, pl_module: pl.LightningModule) -> str:
        """The ``cache_dir`` key of the original model's results under these settings."""
        raise NotImplementedError

    def _to_entry(self, results: Any) -> dict[str, Any]:
        raise NotImplementedError

    def _from_entry(self, entry: dict[str, Any]) -> Any:
        raise NotImplementedError

    # ---- when and where -----------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._check_module(pl_module)
        refuse_sharded_weights(trainer, type(self).__name__)
        self._check_run(trainer)
        if self.dirpath is not None:
            # On every rank, as every check here: a rank that raised alone would leave the
            # others waiting in a collective.
            check_directory_writable(self.dirpath, f"{type(self).__name__} dirpath")
        self._resolve_dirpath(trainer)
        if stage == "fit" and not self.during_fit:
            return  # nothing to evaluate: spare fit the evaluators and the reference images
        key = self._setup_key(trainer, pl_module)
        if key == self._cache_key:
            return
        self._original = None
        self._load(trainer, pl_module)
        self._cache_key = key  # only once loaded: a failed load is retried at the next setup

    def _resolve_dirpath(self, trainer: pl.Trainer) -> None:
        # One folder per W&B run (it has no versioned log dir); trainer.log_dir is a
        # collective, reached by every rank.
        if self.dirpath is not None:
            self._out_dir = self.dirpath
        elif isinstance(trainer.logger, WandbLogger):
            if trainer.is_global_zero:
                self._out_dir = os.path.join(trainer.logger.save_dir or trainer.default_root_dir,
                                             "evaluation", str(trainer.logger.version))
        else:
            self._out_dir = os.path.join(trainer.log_dir or trainer.default_root_dir,
                                         "evaluation")

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        fn = trainer.state.fn
        if fn == TrainerFn.VALIDATING or (self.during_fit and fn == TrainerFn.FITTING):
            self.evaluate(trainer, pl_module)

    @override
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.evaluate(trainer, pl_module)

    # ---- the evaluation -----------------------------------------------------------------
    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """Measure both models, compare, log and write; every rank must call it. Returns
        ``self.results``."""
        self._to_device(pl_module.device)
        original = self._original_results(trainer, pl_module)
        unlearned = self._measure(trainer, pl_module, original=False)
        metrics, details = self._compare(trainer, pl_module, original, unlearned)
        for name, value in metrics.items():
            pl_module.log(f"eval/{name}", value, sync_dist=False)  # the same on every rank
        step = trainer.global_step
        self.results = {"step": step, "stage": trainer.state.fn.value, "metrics": metrics,
                        **details}
        if trainer.is_global_zero:
            out = Path(self._out_dir)
            results = self.write_results(out, step)
            self._write_pictures(trainer, out, results, original, unlearned)
        return self.results

    def _original_results(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        """The original model's results: those in memory while its network is the same;
        else from ``cache_dir`` when it holds them for this very model and these settings on
        every rank; else measured (and stored there)."""
        # The in-memory results belong to one original network: a new module could reuse
        # the id the setup key compared.
        digest = self._original_digest(pl_module)
        if self._original is None or self._original_version != digest:
            self._original = self._cached_or_measured(trainer, pl_module)
            self._original_version = digest
        return self._original

    def _cached_or_measured(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        if self.cache_dir is None:
            return self._measure(trainer, pl_module, original=True)
        cache, key = OriginalCache(self.cache_dir), self._original_key(pl_module)
        entry = cache.load(key)
        # Every rank must take the same path: measuring means collectives (the gathering).
        if trainer.strategy.reduce_boolean_decision(entry is not None, all=True):
            return self._from_entry(entry)
        results = self._measure(trainer, pl_module, original=True)
        if trainer.is_global_zero:
            cache.store(key, self._to_entry(results))
        return results

    # ---- shared tools -------------------------------------------------------------------
    @staticmethod
    def _gather(trainer: pl.Trainer, device: torch.device, *shares: Tensor
                ) -> tuple[Tensor, ...]:
        """Every process's entries, on the CPU: each share is a full-length tensor that is
        zero except where this process made the entry, so the sum over the processes is
        every entry (exactly: the others add zeros). One collective per share, in order."""
        return tuple(trainer.strategy.reduce(share.to(device), reduce_op="sum").cpu()
                     for share in shares)

    @staticmethod
    def _fill_reference(fid: UnlearnedFID, batches: Iterable[Tensor],
                        device: torch.device | str) -> None:
        """Give the reference images (this process's share, batch by batch) to FID's real
        side, from a fresh start: an earlier fill may have failed half-way through. The metric
        keeps them (``reset_real_features=False``): each evaluation resets only the sample
        side, so the reference is read once per setup."""
        fid.to(device)
        fid.reset_real_features = True
        fid.reset()
        fid.reset_real_features = False
        for images in batches:
            fid.update(images.to(device), real=True)

    @staticmethod
    def _load_classifier(path: str | Path, role: str, channels: int, images: str
                         ) -> ClassifierNet:
        """A frozen evaluation classifier from a ``ClassifierModule.save_pretrained``
        directory, refused by ``role`` (its argument's name) unless it takes ``channels``
        channels (``images``: what the model makes, for the message)."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{role} directory not found: {path} (expected a "
                                    "directory written by ClassifierModule.save_pretrained)")
        classifier = load_classifier(path).requires_grad_(False)
        if classifier.in_channels != channels:
            raise ValueError(f"the {role} {path} takes {classifier.in_channels}-channel "
                             f"images but {images}")
        return classifier

    # ---- output -------------------------------------------------------------------------
    def write_results(self, out: Path, step: int) -> dict[str, Any]:
        """``self.results`` as ``<out>/evaluation_step_<step>.json`` (numbers made plain)."""
        self.picture = None  # until this evaluation's own picture is written
        results = json_plain(self.results)
        atomic_write_text(out / f"evaluation_step_{step:07d}.json",
                          json.dumps(results, indent=2, allow_nan=False) + "\n")
        return results

    def write_side_by_side(self, trainer: pl.Trainer, left: Tensor, right: Tensor, out: Path,
                           caption: str) -> None:
        """Two grids ([C, H, W] in [0, 1]) side by side, as ``write_picture``."""
        gap = torch.ones(left.shape[0], left.shape[1], 8)
        self.write_picture(trainer, torch.cat([left, gap, right], dim=2), out, caption)

    def write_picture(self, trainer: pl.Trainer, picture: Tensor | Image.Image, out: Path,
                      caption: str) -> None:
        """``samples_step_<step>.png`` from a grid ([C, H, W] in [0, 1]) or a PIL picture,
        and the logger's image (W&B, TensorBoard)."""
        path = out / f"samples_step_{trainer.global_step:07d}.png"
        if isinstance(picture, Image.Image):
            with atomic_file(path) as tmp:
                picture.save(tmp, format="png")
            grid = torch.from_numpy(np.array(picture)).permute(2, 0, 1).float() / 255
        else:
            save_grid(picture, path)
            grid = picture
        self.log_picture(trainer, path, grid, caption)

    def log_picture(self, trainer: pl.Trainer, path: Path, grid: Tensor, caption: str) -> None:
        """Give a written PNG (``grid``: the same picture, [C, H, W] in [0, 1]) to the loggers
        that show images: W&B (the file: wandb reads float tensors as 0..255) and
        TensorBoard; keep its path for the exported model's card."""
        self.picture = path
        step = trainer.global_step
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="eval/samples", images=[str(path)], step=step,
                                 caption=[caption])
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("eval/samples", grid, global_step=step)
