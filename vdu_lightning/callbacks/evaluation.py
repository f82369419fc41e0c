"""``UnlearningEvaluation``: PUL, u-FID and class histograms of fixed-seed samples.

Sample i is drawn from the same noise by the original and by the unlearned model, so the two
sets are paired. The original model never changes: its predictions, its FID and its grid
images are computed once per (module, datamodule, world) and kept; later evaluations sample
only the unlearned model.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from vdu_lightning.callbacks.samples import image_grid, save_grid
from vdu_lightning.diffusion import seeded_noise
from vdu_lightning.files import atomic_file, atomic_write_text
from vdu_lightning.metrics import PercentUnlearned, UnlearnedFID
from vdu_lightning.modules.classifier import ClassifierModule
from vdu_lightning.modules.compat import refuse_sharded_weights

#: The sampler behind ``sample_from`` (deterministic DDIM), recorded beside every FID.
SAMPLER = "ddim"
_DATAMODULE_NEEDS = ("forget_classes", "retain_classes", "num_classes", "load")


def _positive(name: str, value: Any, least: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be an int >= {least}, got {value!r}")


def _number(value: float) -> float | None:
    """JSON has no NaN or infinity: those become null."""
    return value if math.isfinite(value) else None


def save_histogram(path: str | os.PathLike, original: list[int], unlearned: list[int],
                   forget_classes: list[int]) -> None:
    """Bar chart of both class histograms as PNG, atomically (forgotten classes in red)."""
    from matplotlib.figure import Figure  # optional and slow to import: only when drawing

    figure = Figure(figsize=(max(4.0, 0.45 * len(original)), 3.0), layout="constrained")
    axes = figure.add_subplot()
    classes = range(len(original))
    axes.bar([c - 0.2 for c in classes], original, width=0.4, label="original")
    axes.bar([c + 0.2 for c in classes], unlearned, width=0.4, label="unlearned")
    axes.set_xticks(list(classes), labels=[str(c) for c in classes])
    for cls, label in zip(classes, axes.get_xticklabels()):
        if cls in forget_classes:
            label.set_color("red")
    axes.set(xlabel="predicted class (forgotten in red)", ylabel="samples")
    axes.legend()
    with atomic_file(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)


class EvaluationCallback(pl.Callback):
    """When and where the evaluation callbacks run: on ``vdu validate`` / ``vdu test`` (and
    during fit with ``during_fit``), writing into ``dirpath`` (default: the run's log
    directory, or one folder per W&B run). Subclasses call
    ``_resolve_dirpath`` in ``setup`` and define ``evaluate``."""

    def __init__(self, dirpath: str | None, during_fit: bool) -> None:
        self.dirpath = dirpath
        self.during_fit = during_fit
        self.results: dict[str, Any] = {}
        self._cache_key: tuple | None = None
        self._original: dict[str, Any] | None = None
        self._out_dir: str | None = None

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        raise NotImplementedError

    def write_results(self, out: Path, step: int) -> dict[str, Any]:
        """``self.results`` as ``<out>/evaluation_step_<step>.json`` (numbers made plain)."""
        results = dict(self.results, metrics={k: _number(v) for k, v in
                                              self.results["metrics"].items()})
        atomic_write_text(out / f"evaluation_step_{step:07d}.json",
                          json.dumps(results, indent=2) + "\n")
        return results

    @staticmethod
    def write_side_by_side(trainer: pl.Trainer, left: Tensor, right: Tensor, out: Path,
                           caption: str) -> None:
        """Two grids ([C, H, W] in [0, 1]) side by side: ``samples_step_<step>.png``, and the
        logger's image (W&B, TensorBoard)."""
        step = trainer.global_step
        gap = torch.ones(left.shape[0], left.shape[1], 8)
        grid = torch.cat([left, gap, right], dim=2)
        path = out / f"samples_step_{step:07d}.png"
        save_grid(grid, path)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):  # the PNG: wandb reads float tensors as 0..255
                logger.log_image(key="eval/samples", images=[str(path)], step=step,
                                 caption=[caption])
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("eval/samples", grid, global_step=step)

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

    # ---- when ---------------------------------------------------------------------------
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        fn = trainer.state.fn
        if fn == TrainerFn.VALIDATING or (self.during_fit and fn == TrainerFn.FITTING):
            self.evaluate(trainer, pl_module)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.evaluate(trainer, pl_module)


class UnlearningEvaluation(EvaluationCallback):
    """Evaluate unlearning on ``vdu validate`` / ``vdu test``: PUL, u-FID, histograms, grid.

    The module must provide ``sample_shape`` and ``sample_from(noise, original=False,
    num_steps=None)`` (images in [-1, 1]); the datamodule ``forget_classes``,
    ``retain_classes``, ``num_classes`` and ``load(split)``. Under DDP each rank samples
    ``noise[rank::world_size]`` of the same ``num_samples`` noises, so the results equal a
    single-process run's. Logged (already synced): ``eval/pul``, ``eval/<fid name>``,
    ``eval/original/<fid name>``, ``eval/u_fid_ratio`` (unlearned / original),
    ``eval/forget_fraction_original``, ``eval/forget_fraction_unlearned``. Rank 0 writes
    ``evaluation_step_XXXXXXX.json``, ``samples_step_XXXXXXX.png`` (left original, right
    unlearned) and ``histogram_step_XXXXXXX.png`` to ``dirpath``. The last results stay in
    ``self.results``.

    Args:
        classifier: a ``ClassifierModule.save_pretrained`` directory (labels, and FID features
            unless ``inception_weights`` is given).
        num_samples: N, samples per model.
        seed: seed of the noises (and of the reference subset).
        num_steps: sampler steps.
        batch_size: noises per ``sample_from`` call (and images per feature pass).
        inception_weights: a local Inception-v3 weights file for FID (needs torch-fidelity).
        reference_split: the split whose retained-class images are FID's real images.
        num_reference: the most reference images (a seeded subset); None: all.
        grid_images: samples per side of the grid (0: no grid).
        dirpath: where files go; default ``<trainer.log_dir>/evaluation``.
        during_fit: also evaluate at fit's validations (minutes on a CPU), never in the
            sanity check.

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: vdu_lightning.callbacks.UnlearningEvaluation
              init_args: {classifier: runs/mnist5k/classifier, num_samples: 1000}
    """

    def __init__(
        self,
        classifier: str,
        num_samples: int = 1000,
        seed: int = 0,
        num_steps: int = 50,
        batch_size: int = 250,
        inception_weights: str | None = None,
        reference_split: str = "train",
        num_reference: int | None = None,
        grid_images: int = 32,
        dirpath: str | None = None,
        during_fit: bool = False,
    ) -> None:
        _positive("num_samples", num_samples, 2)  # FID needs two samples
        _positive("num_steps", num_steps)
        _positive("batch_size", batch_size)
        _positive("grid_images", grid_images, 0)
        if num_reference is not None:
            _positive("num_reference", num_reference, 2)
        self.classifier = classifier
        self.num_samples = num_samples
        self.seed = seed
        self.num_steps = num_steps
        self.batch_size = batch_size
        self.inception_weights = inception_weights
        self.reference_split = reference_split
        self.num_reference = num_reference
        self.grid_images = grid_images
        super().__init__(dirpath, during_fit)

    # ---- setup: every check before any sampling -----------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not callable(getattr(pl_module, "sample_from", None)) or not hasattr(
                pl_module, "sample_shape"):
            raise TypeError(f"UnlearningEvaluation needs a module with sample_shape and "
                            f"sample_from(noise, original, num_steps); "
                            f"{type(pl_module).__name__} lacks them")
        refuse_sharded_weights(trainer, "UnlearningEvaluation")
        data = trainer.datamodule
        missing = [name for name in _DATAMODULE_NEEDS if not hasattr(data, name)]
        if missing:
            raise TypeError(f"UnlearningEvaluation needs a datamodule with {_DATAMODULE_NEEDS} "
                            f"(e.g. ForgetSetDataModule); {type(data).__name__} lacks {missing}")
        if trainer.world_size > self.num_samples:
            raise ValueError(f"num_samples={self.num_samples} is fewer than the "
                             f"{trainer.world_size} processes: each needs a sample")
        self._resolve_dirpath(trainer)
        if stage == "fit" and not self.during_fit:
            return  # nothing to evaluate: spare fit the classifier and the reference images
        key = (id(pl_module), id(data), trainer.world_size, trainer.global_rank)
        if key == self._cache_key:
            return
        self._cache_key, self._original = key, None
        self._classifier = self._load_classifier(data, tuple(pl_module.sample_shape))
        self._pul = PercentUnlearned(self._classifier.hparams.num_classes, data.forget_classes)
        if self.inception_weights is not None:
            self._fid = UnlearnedFID(inception_weights=self.inception_weights, sampler=SAMPLER,
                                     num_steps=self.num_steps)
        else:
            self._fid = UnlearnedFID(classifier=self._classifier, sampler=SAMPLER,
                                     num_steps=self.num_steps)
        self._reference = self._reference_images(data, tuple(pl_module.sample_shape), trainer)

    def _load_classifier(self, data: Any, sample_shape: tuple[int, ...]) -> ClassifierModule:
        path = Path(self.classifier)
        if not path.is_dir():
            raise FileNotFoundError(f"evaluation classifier directory not found: {path} "
                                    "(expected a directory written by "
                                    "ClassifierModule.save_pretrained)")
        classifier = ClassifierModule.from_pretrained(path).requires_grad_(False)
        classes = classifier.hparams.num_classes
        if data.num_classes and data.num_classes != classes:
            raise ValueError(f"the classifier {path} has {classes} classes but the data set "
                             f"has {data.num_classes}: use a classifier trained on this data")
        outside = [c for c in list(data.forget_classes) + list(data.retain_classes or [])
                   if not 0 <= c < classes]
        if outside:
            raise ValueError(f"classes {outside} are outside the classifier's [0, {classes - 1}]")
        if classifier.hparams.in_channels != sample_shape[0]:
            raise ValueError(f"the classifier takes {classifier.hparams.in_channels}-channel "
                             f"images but the model samples {sample_shape}")
        return classifier

    def _reference_images(self, data: Any, sample_shape: tuple[int, ...],
                          trainer: pl.Trainer) -> tuple[Any, Tensor]:
        """This rank's share of the (seeded, capped) retained-class images of the split."""
        dataset = data.load(self.reference_split)
        if not hasattr(dataset, "labels"):
            raise TypeError(f"the {self.reference_split!r} split must have a .labels tensor to "
                            "pick its retained-class images")
        retain = torch.tensor(list(data.retain_classes or []), dtype=torch.int64)
        members = torch.nonzero(torch.isin(torch.as_tensor(dataset.labels), retain)).flatten()
        if len(members) < 2:
            raise ValueError(f"the {self.reference_split!r} split has {len(members)} images of "
                             f"the retained classes {retain.tolist()}; FID needs at least 2")
        if self.num_reference is not None and self.num_reference < len(members):
            generator = torch.Generator().manual_seed(self.seed)
            chosen = torch.randperm(len(members), generator=generator)[:self.num_reference]
            members = torch.sort(members[chosen]).values
        shape = tuple(dataset[int(members[0])]["image"].shape)
        if shape != sample_shape:
            raise ValueError(f"reference images have shape {shape} but samples {sample_shape}")
        self._reference_count = len(members)
        return dataset, members[trainer.global_rank::trainer.world_size]

    # ---- what ---------------------------------------------------------------------------
    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """Sample, score, log and write; every rank must call it. Returns ``self.results``."""
        device = pl_module.device
        for part in (self._classifier, self._fid, self._pul):
            part.to(device)
        noise = seeded_noise(self.num_samples, tuple(pl_module.sample_shape), self.seed)
        noise = noise[trainer.global_rank::trainer.world_size]
        if self._original is None:
            self._add_reference(device)
            self._original = self._sample_and_score(trainer, pl_module, noise, original=True)
            self._reference = None  # its statistics stay in the FID metric
        unlearned = self._sample_and_score(trainer, pl_module, noise, original=False)
        self._pul.reset()
        self._pul.update(self._original["preds"].to(device), unlearned["preds"])
        pul = float(self._pul.compute())
        hist_original, hist_unlearned = (h.cpu() for h in self._pul.histograms())
        forget = torch.tensor(self._pul.forget_classes)
        fid_original, fid_unlearned = self._original["fid"], unlearned["fid"]
        metrics = {
            "pul": pul,
            self._fid.name: fid_unlearned,
            f"original/{self._fid.name}": fid_original,
            "u_fid_ratio": fid_unlearned / fid_original if fid_original > 0 else float("nan"),
            "forget_fraction_original": float(hist_original[forget].sum()) / self.num_samples,
            "forget_fraction_unlearned": float(hist_unlearned[forget].sum()) / self.num_samples,
        }
        for name, value in metrics.items():
            pl_module.log(f"eval/{name}", value, sync_dist=False)  # values are synced already
        self.results = {
            "step": trainer.global_step,
            "stage": trainer.state.fn.value,
            "metrics": metrics,
            "histograms": {"original": hist_original.tolist(),
                           "unlearned": hist_unlearned.tolist()},
            "forget_classes": list(self._pul.forget_classes),
            "retain_classes": list(trainer.datamodule.retain_classes),
            "num_samples": self.num_samples,
            "seed": self.seed,
            "sampler": SAMPLER,
            "num_steps": self.num_steps,
            "features": self._fid.feature_kind,
            "fid_name": self._fid.name,
            "reference_split": self.reference_split,
            "num_reference": self._reference_count,
            "classifier": str(self.classifier),
        }
        if trainer.is_global_zero:
            self._write(trainer, self._original["grid"], unlearned["grid"])
        return self.results

    def _add_reference(self, device: torch.device) -> None:
        # A fresh start: an earlier evaluation may have failed half-way through.
        self._fid.reset_real_features = True
        self._fid.reset()
        self._fid.reset_real_features = False
        dataset, indices = self._reference
        for chunk in indices.split(self.batch_size):
            images = torch.stack([dataset[int(i)]["image"] for i in chunk])
            self._fid.update(images.to(device), real=True)

    def _sample_and_score(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                          noise: Tensor, original: bool) -> dict[str, Any]:
        """Labels and FID of this rank's samples, and the first ``grid_images`` of all ranks."""
        self._fid.reset()  # fake statistics left by an evaluation that failed half-way
        world = trainer.world_size
        per_rank = min(math.ceil(self.grid_images / world), self.num_samples // world)
        preds, firsts = [], []
        for chunk in noise.split(self.batch_size):
            images = pl_module.sample_from(chunk.to(pl_module.device), original=original,
                                           num_steps=self.num_steps)
            if tuple(images.shape) != tuple(chunk.shape):
                raise ValueError(f"sample_from returned shape {tuple(images.shape)} for noise "
                                 f"of shape {tuple(chunk.shape)}")
            images = images.float()
            preds.append(self._classifier.predict_labels(images))
            self._fid.update(images, real=False)
            kept = sum(len(f) for f in firsts)
            if kept < per_rank:
                firsts.append(images[:per_rank - kept])
        fid = float(self._fid.compute())
        self._fid.reset()  # the fake statistics only; the real ones are kept
        grid = torch.cat(firsts) if firsts else noise[:0]
        if world > 1 and per_rank > 0:
            # Rank r holds samples r, r + W, ...: interleave to get samples 0, 1, 2, ...
            gathered = trainer.strategy.all_gather(grid)
            grid = gathered.transpose(0, 1).reshape(-1, *grid.shape[1:])
        return {"preds": torch.cat(preds).cpu(), "fid": fid,
                "grid": grid[:self.grid_images].cpu()}

    def _write(self, trainer: pl.Trainer, original: Tensor, unlearned: Tensor) -> None:
        step = trainer.global_step
        out = Path(self._out_dir)
        results = self.write_results(out, step)
        try:
            save_histogram(out / f"histogram_step_{step:07d}.png", results["histograms"][
                "original"], results["histograms"]["unlearned"], results["forget_classes"])
        except ImportError:
            rank_zero_warn("matplotlib is not installed: no histogram PNG (the JSON has it)")
        if len(original) == 0:
            return
        self.write_side_by_side(trainer, image_grid(original), image_grid(unlearned), out,
                                f"left original, right unlearned; step {step}, seed {self.seed}")
