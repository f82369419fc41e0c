"""``UnlearningEvaluation``: PUL and u-FID by two evaluators, measures that need no
classifier, histograms and readable grids, of fixed-seed samples (method.md §4).

Sample i is drawn from the same noise by the original and by the unlearned model, so the two
sets are paired. The original model never changes: its samples and its likelihood of the
held-out images are computed once per (module, datamodule, world) and kept, and on disk with
``cache_dir``; later evaluations sample only the unlearned model. The scoring itself is
``vdu_lightning.evaluation`` (plain torch), the same code the demo and the benchmarks use.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from vdu_lightning.callbacks.samples import save_grid
from vdu_lightning.diffusion import seeded_noise
from vdu_lightning.evaluation import (
    ClassifierNet,
    Likelihood,
    PairedEvaluation,
    before_after_grid,
    likelihood_change,
    load_classifier,
    variational_bound,
)
from vdu_lightning.evaluation.cache import (
    OriginalCache,
    from_entry,
    original_key,
    state_digest,
    to_entry,
)
from vdu_lightning.evaluation.references import held_out_parts, retained_reference
from vdu_lightning.files import atomic_file, atomic_write_text
from vdu_lightning.metrics import UnlearnedFID
from vdu_lightning.modules.compat import refuse_sharded_weights

#: The sampler behind ``sample_from`` (deterministic DDIM), recorded beside every FID.
SAMPLER = "ddim"
_DATAMODULE_NEEDS = ("forget_classes", "retain_classes", "num_classes", "load")


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
        #: The latest before/after PNG written (rank 0), shown by the exported model's card.
        self.picture: Path | None = None
        self._cache_key: tuple | None = None
        self._original: dict[str, Any] | None = None
        self._out_dir: str | None = None

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        raise NotImplementedError

    def write_results(self, out: Path, step: int) -> dict[str, Any]:
        """``self.results`` as ``<out>/evaluation_step_<step>.json`` (numbers made plain)."""
        self.picture = None  # until this evaluation's own grid is written
        results = json_plain(self.results)
        atomic_write_text(out / f"evaluation_step_{step:07d}.json",
                          json.dumps(results, indent=2, allow_nan=False) + "\n")
        return results

    def write_side_by_side(self, trainer: pl.Trainer, left: Tensor, right: Tensor, out: Path,
                           caption: str) -> None:
        """Two grids ([C, H, W] in [0, 1]) side by side: ``samples_step_<step>.png``, and the
        logger's image (W&B, TensorBoard)."""
        gap = torch.ones(left.shape[0], left.shape[1], 8)
        grid = torch.cat([left, gap, right], dim=2)
        path = out / f"samples_step_{trainer.global_step:07d}.png"
        save_grid(grid, path)
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
    """Evaluate unlearning on ``vdu validate`` / ``vdu test``: two evaluators' PUL and u-FID,
    classifier-free measures, histograms and a captioned before/after grid.

    The module must provide ``sample_shape`` and ``sample_from(noise, original=False,
    num_steps=None)`` (images in [-1, 1]); for the likelihood measures also ``unet``,
    ``original_unet`` and ``scheduler`` (as every ``UnlearningModule``). The datamodule must
    provide ``forget_classes``, ``retain_classes``, ``num_classes`` and ``load(split)``, and
    for the likelihood ``forget_eval_set`` / ``retain_eval_set`` (held-out real images, as
    ``ForgetSetDataModule``). Under DDP each rank samples ``noise[rank::world_size]`` of the
    same ``num_samples`` noises and the samples are gathered, so the results equal a
    single-process run's.

    Measured (``vdu_lightning.evaluation``; every value in ``self.results``):

    * per evaluator (``classifier``, and ``second_classifier`` if given): PUL, u-FID of both
      models against the real retained-class images of ``reference_split`` and its ratio,
      the class histograms, the retained-class drift; the PUL gap between the two, flagged
      above ``disagreement`` points;
    * with no classifier: the variational bound (bits per dimension) and denoising error of
      the held-out forget and retain images under both models, the forget increase less the
      retain increase and their ratio (the selectivity); the same-seed pixel change of the seeds
      whose original is a forgotten class and of the others; the shift of the samples' mean
      and background intensity.

    Logged (already synced): ``eval/pul``, ``eval/u_fid_ratio``, ``eval/<fid name>``,
    ``eval/original/<fid name>``, ``eval/forget_fraction_*``, ``eval/retained_drift`` (the
    primary evaluator); ``eval/second_classifier/pul`` and ``.../u_fid_ratio``;
    ``eval/pul_disagreement``; ``eval/sample_change/{retained,forgotten,ratio}``;
    ``eval/intensity/{mean_shift,background_shift}``;
    ``eval/likelihood/{forget,retain}_bpd_increase``, ``eval/likelihood/forget_minus_retain``
    and, when the retain increase is clearly above its noise, ``eval/likelihood/selectivity``.
    Rank 0 writes ``evaluation_step_XXXXXXX.json``, ``samples_step_XXXXXXX.png`` (left
    original, right unlearned, upscaled and captioned with the primary evaluator's label and
    confidence, originals of a forgotten class framed in red) and
    ``histogram_step_XXXXXXX.png`` to ``dirpath``, and gives the grid to W&B / TensorBoard.

    Args:
        classifier: the primary evaluator, a ``ClassifierModule.save_pretrained`` directory.
        second_classifier: an independent second evaluator (another architecture and seed).
        num_samples: N, samples per model.
        seed: seed of the noises (and of the reference subset).
        num_steps: sampler steps.
        batch_size: noises per ``sample_from`` call (and images per network pass).
        inception_weights: also a u-FID on Inception-v3 from this local weights file.
        reference_split: the split whose retained-class images are FID's real images.
        num_reference: the most reference images (a seeded subset); None: all.
        grid_images: samples per side of the grid (0: no grid).
        grid_tile: pixels per sample side in the grid.
        likelihood_timesteps: Monte Carlo timesteps per held-out image for the bound (0: skip
            the likelihood measures).
        disagreement: the PUL gap (points) between the evaluators that is flagged.
        cache_dir: keep the original model's samples and likelihood here between runs.
        dirpath: where files go; default ``<trainer.log_dir>/evaluation``.
        during_fit: also evaluate at fit's validations (minutes on a CPU), never in the
            sanity check.

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: vdu_lightning.callbacks.UnlearningEvaluation
              init_args: {classifier: runs/mnist5k/classifier,
                          second_classifier: runs/mnist5k/classifier_lenet}
    """

    def __init__(
        self,
        classifier: str,
        second_classifier: str | None = None,
        num_samples: int = 1000,
        seed: int = 0,
        num_steps: int = 50,
        batch_size: int = 250,
        inception_weights: str | None = None,
        reference_split: str = "train",
        num_reference: int | None = None,
        grid_images: int = 32,
        grid_tile: int = 64,
        likelihood_timesteps: int = 8,
        disagreement: float = 10.0,
        cache_dir: str | None = None,
        dirpath: str | None = None,
        during_fit: bool = False,
    ) -> None:
        _positive("num_samples", num_samples, 2)  # FID needs two samples
        _positive("num_steps", num_steps)
        _positive("batch_size", batch_size)
        _positive("grid_images", grid_images, 0)
        _positive("grid_tile", grid_tile, 8)
        _positive("likelihood_timesteps", likelihood_timesteps, 0)
        if num_reference is not None:
            _positive("num_reference", num_reference, 2)
        if not disagreement >= 0:
            raise ValueError(f"disagreement must be a number of points >= 0, got "
                             f"{disagreement!r}")
        self.classifier = classifier
        self.second_classifier = second_classifier
        self.num_samples = num_samples
        self.seed = seed
        self.num_steps = num_steps
        self.batch_size = batch_size
        self.inception_weights = inception_weights
        self.reference_split = reference_split
        self.num_reference = num_reference
        self.grid_images = grid_images
        self.grid_tile = grid_tile
        self.likelihood_timesteps = likelihood_timesteps
        self.disagreement = disagreement
        self.cache_dir = cache_dir
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
            return  # nothing to evaluate: spare fit the classifiers and the reference images
        key = (id(pl_module), id(data), trainer.world_size, trainer.global_rank)
        if key == self._cache_key:
            return
        self._cache_key, self._original = key, None
        shape = tuple(pl_module.sample_shape)
        evaluators = {"classifier": self._load_classifier(self.classifier, data, shape)}
        if self.second_classifier is not None:
            evaluators["second_classifier"] = self._load_classifier(self.second_classifier,
                                                                    data, shape)
        reference = self._reference_images(data, shape)
        self._paired = PairedEvaluation(evaluators, data.forget_classes, reference, SAMPLER,
                                        self.num_steps, self.disagreement, self.batch_size)
        self._inception = None
        if self.inception_weights is not None:
            self._inception = UnlearnedFID(inception_weights=self.inception_weights,
                                           sampler=SAMPLER, num_steps=self.num_steps,
                                           sync_on_compute=False)
            for chunk in reference.split(self.batch_size):
                self._inception.update(chunk, real=True)
        self._held_out = self._held_out_images(pl_module, data)

    def _load_classifier(self, path: str, data: Any, sample_shape: tuple[int, ...]
                         ) -> ClassifierNet:
        classifier = load_classifier(path).requires_grad_(False)
        classes = classifier.num_classes
        if data.num_classes and data.num_classes != classes:
            raise ValueError(f"the classifier {path} has {classes} classes but the data set "
                             f"has {data.num_classes}: use a classifier trained on this data")
        outside = [c for c in list(data.forget_classes) + list(data.retain_classes or [])
                   if not 0 <= c < classes]
        if outside:
            raise ValueError(f"classes {outside} are outside the classifier's [0, {classes - 1}]")
        if classifier.in_channels != sample_shape[0]:
            raise ValueError(f"the classifier {path} takes {classifier.in_channels}-channel "
                             f"images but the model samples {sample_shape}")
        return classifier

    def _reference_images(self, data: Any, sample_shape: tuple[int, ...]) -> Tensor:
        """The (seeded, capped) retained-class images of the split: FID's real images."""
        images = retained_reference(data, self.reference_split, self.num_reference, self.seed)
        if tuple(images.shape[1:]) != sample_shape:
            raise ValueError(f"reference images have shape {tuple(images.shape[1:])} but "
                             f"samples {sample_shape}")
        return images

    def _held_out_images(self, pl_module: pl.LightningModule, data: Any
                         ) -> dict[str, tuple[Tensor, Tensor]] | None:
        """The held-out forget and retain images (and labels) the likelihood is measured on,
        or None when the module or the datamodule cannot give them."""
        needs = ("unet", "original_unet", "scheduler")
        if self.likelihood_timesteps == 0 or not all(hasattr(pl_module, n) for n in needs):
            return None
        parts = held_out_parts(data)
        if parts is not None and self._conditional(pl_module) and any(
                bool((labels < 0).any()) for _, labels in parts.values()):
            rank_zero_warn("UnlearningEvaluation: the held-out images of a forget set given "
                           "without labels cannot be scored by a label-conditional model: no "
                           "likelihood measures")
            return None
        return parts

    @staticmethod
    def _conditional(pl_module: pl.LightningModule) -> bool:
        return bool(getattr(pl_module, "conditional", False))

    # ---- what ---------------------------------------------------------------------------
    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """Sample, score, log and write; every rank must call it. Returns ``self.results``."""
        self._paired.to(pl_module.device)
        # The in-memory results belong to one original network: a new module could reuse
        # the id the setup check compared.
        digest = (state_digest(pl_module.original_unet)
                  if hasattr(pl_module, "original_unet") else None)
        if self._original is None or self._original["digest"] != digest:
            self._original = self._original_results(trainer, pl_module)
            self._original["digest"] = digest
        original = self._original["samples"]
        unlearned = self._sample(trainer, pl_module, original=False)
        paired = self._paired.compare(original, unlearned)
        likelihood = None
        if self._held_out is not None:
            likelihood = likelihood_change(self._original["likelihood"],
                                           self._likelihood(pl_module, original=False))
        inception = self._inception_scores(original, unlearned, pl_module.device)
        metrics = self._metrics(paired, likelihood, inception)
        for name, value in metrics.items():
            pl_module.log(f"eval/{name}", value, sync_dist=False)  # the same on every rank
        primary = paired["evaluators"]["classifier"]
        self.results = {
            "step": trainer.global_step,
            "stage": trainer.state.fn.value,
            "metrics": metrics,
            "paired": paired,
            "likelihood": likelihood,
            "inception": inception,
            "histograms": {"original": primary["histogram_original"],
                           "unlearned": primary["histogram_unlearned"]},
            "forget_classes": list(self._paired.forget_classes),
            "retain_classes": list(trainer.datamodule.retain_classes),
            "num_samples": self.num_samples,
            "seed": self.seed,
            "sampler": SAMPLER,
            "num_steps": self.num_steps,
            "features": "classifier",
            "fid_name": primary["u_fid_name"],
            "reference_split": self.reference_split,
            "num_reference": self._paired.reference_count,
            "classifier": str(self.classifier),
            "second_classifier": (None if self.second_classifier is None
                                  else str(self.second_classifier)),
        }
        if trainer.is_global_zero:
            self._write(trainer, original, unlearned)
        return self.results

    @staticmethod
    def _metrics(paired: dict[str, Any], likelihood: dict[str, Any] | None,
                 inception: dict[str, Any] | None) -> dict[str, float]:
        """The scalar measures, flat, as logged and as in the report's table."""
        primary = paired["evaluators"]["classifier"]
        fid = primary["u_fid_name"]
        metrics = {
            "pul": primary["pul"], fid: primary["u_fid"],
            f"original/{fid}": primary["u_fid_original"], "u_fid_ratio": primary["u_fid_ratio"],
            "forget_fraction_original": primary["forget_fraction_original"],
            "forget_fraction_unlearned": primary["forget_fraction_unlearned"],
            "retained_drift": primary["retained_drift"],
        }
        for name, scores in paired["evaluators"].items():
            if name != "classifier":
                metrics.update({f"{name}/pul": scores["pul"],
                                f"{name}/u_fid_ratio": scores["u_fid_ratio"]})
        if paired["pul_disagreement"] is not None:
            metrics["pul_disagreement"] = paired["pul_disagreement"]
        change = paired["sample_change"]
        for part in ("retained", "forgotten", "ratio"):
            if change[part] is not None:
                metrics[f"sample_change/{part}"] = change[part]
        metrics["intensity/mean_shift"] = paired["intensity"]["mean_shift"]
        metrics["intensity/background_shift"] = paired["intensity"]["background_shift"]
        if likelihood is not None:
            for part in ("forget", "retain"):
                metrics[f"likelihood/{part}_bpd_increase"] = likelihood[part][
                    "bits_per_dim_increase"]
            metrics["likelihood/forget_minus_retain"] = likelihood["forget_minus_retain"]
            if likelihood["selectivity"] is not None:
                metrics["likelihood/selectivity"] = likelihood["selectivity"]
        if inception is not None:
            metrics[inception["name"]] = inception["u_fid"]
            metrics[f"original/{inception['name']}"] = inception["u_fid_original"]
        return {name: float(value) for name, value in metrics.items()}

    def _original_results(self, trainer: pl.Trainer, pl_module: pl.LightningModule
                          ) -> dict[str, Any]:
        """The original model's samples and likelihood: from ``cache_dir`` if it holds them
        for this very model and these settings on every rank, else computed (and stored)."""
        cache = key = entry = None
        if self.cache_dir is not None:
            cache, key = OriginalCache(self.cache_dir), self._original_key(pl_module)
            entry = cache.load(key)
        # Every rank must take the same path: computing means collectives (the gathering).
        if trainer.strategy.reduce_boolean_decision(entry is not None, all=True):
            samples, likelihood = from_entry(entry)
            return {"samples": samples, "likelihood": likelihood}
        samples = self._sample(trainer, pl_module, original=True)
        likelihood = (None if self._held_out is None else
                      self._likelihood(pl_module, original=True))
        if cache is not None and trainer.is_global_zero:
            cache.store(key, to_entry(samples, likelihood))
        return {"samples": samples, "likelihood": likelihood}

    def _original_key(self, pl_module: pl.LightningModule) -> str:
        if not hasattr(pl_module, "original_unet") or not hasattr(pl_module, "scheduler"):
            raise TypeError("cache_dir needs a module with original_unet and scheduler (the "
                            "pre-trained network and schedule the cache is keyed by)")
        held_out = {} if self._held_out is None else {
            f"{part}_{what}": tensor for part, pair in self._held_out.items()
            for what, tensor in zip(("images", "labels"), pair)}
        return original_key(pl_module.original_unet, pl_module.scheduler.config,
                            shape=list(pl_module.sample_shape), num_samples=self.num_samples,
                            seed=self.seed, num_steps=self.num_steps, sampler=SAMPLER,
                            conditional=self._conditional(pl_module),
                            likelihood_timesteps=self.likelihood_timesteps, **held_out)

    def _sample(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                original: bool) -> Tensor:
        """All ``num_samples`` samples, in order: each rank draws its share and they are
        gathered. A label-conditional model draws sample i with label i mod C, whatever the
        rank or batch."""
        world, rank = trainer.world_size, trainer.global_rank
        noise = seeded_noise(self.num_samples, tuple(pl_module.sample_shape), self.seed)
        mine = noise[rank::world]
        labels = None
        if self._conditional(pl_module):
            labels = (torch.arange(self.num_samples) % pl_module.num_classes)[rank::world]
        chunks = []
        for index in torch.arange(len(mine)).split(self.batch_size):
            chunk = mine[index]
            kwargs = {} if labels is None else {"labels": labels[index]}
            images = pl_module.sample_from(chunk.to(pl_module.device), original=original,
                                           num_steps=self.num_steps, **kwargs)
            if tuple(images.shape) != tuple(chunk.shape):
                raise ValueError(f"sample_from returned shape {tuple(images.shape)} for noise "
                                 f"of shape {tuple(chunk.shape)}")
            chunks.append(images.float())
        samples = torch.cat(chunks)
        if world == 1:
            return samples.cpu()
        # Rank r holds samples r, r + W, ...: pad every share to the same length (the padding
        # lands past the end), gather, and interleave to get samples 0, 1, 2, ...
        per_rank = math.ceil(self.num_samples / world)
        padding = samples[-1:].expand(per_rank - len(samples), *samples.shape[1:])
        gathered = trainer.strategy.all_gather(torch.cat([samples, padding]))
        interleaved = gathered.transpose(0, 1).reshape(-1, *samples.shape[1:])
        return interleaved[:self.num_samples].cpu()

    def _likelihood(self, pl_module: pl.LightningModule, original: bool
                    ) -> dict[str, Likelihood]:
        """The bound of each held-out part under one model (every rank computes all of it:
        a few seconds, and no collective)."""
        unet = pl_module.original_unet if original else pl_module.unet
        conditional = self._conditional(pl_module)
        return {part: variational_bound(unet, pl_module.scheduler.betas, images,
                                        labels if conditional else None,
                                        self.likelihood_timesteps, self.seed, self.batch_size)
                for part, (images, labels) in self._held_out.items()}

    def _inception_scores(self, original: Tensor, unlearned: Tensor,
                          device: torch.device) -> dict[str, Any] | None:
        if self._inception is None:
            return None
        fid = self._inception.to(device)
        values = []
        for images in (original, unlearned):
            fid.reset()
            for chunk in images.split(self.batch_size):
                fid.update(chunk.to(device), real=False)
            values.append(float(fid.compute()))
        fid.reset()
        return {"name": fid.name, "u_fid_original": values[0], "u_fid": values[1],
                "u_fid_ratio": values[1] / values[0] if values[0] > 0 else float("nan")}

    def _write(self, trainer: pl.Trainer, original: Tensor, unlearned: Tensor) -> None:
        step = trainer.global_step
        out = Path(self._out_dir)
        results = self.write_results(out, step)
        try:
            save_histogram(out / f"histogram_step_{step:07d}.png", results["histograms"][
                "original"], results["histograms"]["unlearned"], results["forget_classes"])
        except ImportError:
            rank_zero_warn("matplotlib is not installed: no histogram PNG (the JSON has it)")
        count = min(self.grid_images, len(original))
        if count == 0:
            return
        primary = self._paired.evaluators["classifier"]
        picture = before_after_grid(
            original[:count], unlearned[:count],
            *(primary.predict(images[:count]) for images in (original, unlearned)),
            self._paired.forget_classes, evaluator="the classifier", tile=self.grid_tile)
        path = out / f"samples_step_{step:07d}.png"
        with atomic_file(path) as tmp:
            picture.save(tmp, format="png")
        grid = torch.from_numpy(np.array(picture)).permute(2, 0, 1).float() / 255
        self.log_picture(trainer, path, grid,
                         f"left original, right unlearned; step {step}, seed {self.seed}; "
                         "captions: label and confidence; red: originals of a forgotten class")
