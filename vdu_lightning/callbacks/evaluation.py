"""``UnlearningEvaluation``: PUL and u-FID by two evaluators, measures that need no
classifier, histograms and readable grids, of fixed-seed samples (docs/method.md §4).

Sample i is drawn from the same noise by the original and by the unlearned model, so the two
sets are paired. The original model never changes: its samples and its likelihood of the
held-out images are computed once per (module, datamodule, world) and kept, and on disk with
``cache_dir``; later evaluations sample only the unlearned model. The scoring itself is
``vdu_lightning.evaluation`` (plain torch), the same code the demo and the benchmarks use; what
every evaluation callback shares is ``EvaluationCallback``'s.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from vdu_lightning.callbacks.evaluation_base import (
    EvaluationCallback,
    _positive,
    json_plain,
    u_fid_metrics,
)
from vdu_lightning.diffusion import seeded_noise
from vdu_lightning.evaluation import (
    ClassifierNet,
    Likelihood,
    PairedEvaluation,
    before_after_grid,
    likelihood_change,
    variational_bound,
)
from vdu_lightning.evaluation.cache import from_entry, original_key, state_digest, to_entry
from vdu_lightning.evaluation.paired import sample_fid, u_fid_ratio
from vdu_lightning.evaluation.references import held_out_parts, retained_reference
from vdu_lightning.files import atomic_file
from vdu_lightning.metrics import UnlearnedFID

__all__ = ["EvaluationCallback", "SAMPLER", "UnlearningEvaluation", "json_plain",
           "save_histogram"]

#: The sampler behind ``sample_from`` (deterministic DDIM), recorded beside every FID.
SAMPLER = "ddim"
_DATAMODULE_NEEDS = ("forget_classes", "retain_classes", "num_classes", "load")


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
        super().__init__(dirpath, during_fit, cache_dir)

    # ---- setup: every check before any sampling -----------------------------------------
    @override
    def _check_module(self, pl_module: pl.LightningModule) -> None:
        if not callable(getattr(pl_module, "sample_from", None)) or not hasattr(
                pl_module, "sample_shape"):
            raise TypeError(f"UnlearningEvaluation needs a module with sample_shape and "
                            f"sample_from(noise, original, num_steps); "
                            f"{type(pl_module).__name__} lacks them")

    @override
    def _check_run(self, trainer: pl.Trainer) -> None:
        data = trainer.datamodule
        missing = [name for name in _DATAMODULE_NEEDS if not hasattr(data, name)]
        if missing:
            raise TypeError(f"UnlearningEvaluation needs a datamodule with {_DATAMODULE_NEEDS} "
                            f"(e.g. ForgetSetDataModule); {type(data).__name__} lacks {missing}")
        if trainer.world_size > self.num_samples:
            raise ValueError(f"num_samples={self.num_samples} is fewer than the "
                             f"{trainer.world_size} processes: each needs a sample")

    @override
    def _setup_key(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple:
        return (*super()._setup_key(trainer, pl_module), id(trainer.datamodule))

    @override
    def _load(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        data, shape = trainer.datamodule, tuple(pl_module.sample_shape)
        evaluators = {"classifier": self._evaluator("classifier", data, shape)}
        if self.second_classifier is not None:
            evaluators["second_classifier"] = self._evaluator("second_classifier", data, shape)
        reference = self._reference_images(data, shape)
        self._paired = PairedEvaluation(evaluators, data.forget_classes, reference, SAMPLER,
                                        self.num_steps, self.disagreement, self.batch_size)
        self._inception = None
        if self.inception_weights is not None:
            # Every process scores the full sets: no syncing (it would count them twice).
            self._inception = UnlearnedFID(inception_weights=self.inception_weights,
                                           sampler=SAMPLER, num_steps=self.num_steps,
                                           sync_on_compute=False)
            self._fill_reference(self._inception, reference.split(self.batch_size), "cpu")
        self._held_out = self._held_out_images(pl_module, data)

    def _evaluator(self, role: str, data: Any, sample_shape: tuple[int, ...]) -> ClassifierNet:
        """The classifier of argument ``role``, refused unless it reads this data's classes
        and the model's samples."""
        path = getattr(self, role)
        classifier = self._load_classifier(path, role, sample_shape[0],
                                           f"the model samples {sample_shape}")
        classes = classifier.num_classes
        if data.num_classes and data.num_classes != classes:
            raise ValueError(f"the {role} {path} has {classes} classes but the data set "
                             f"has {data.num_classes}: use a classifier trained on this data")
        outside = [c for c in list(data.forget_classes) + list(data.retain_classes or [])
                   if not 0 <= c < classes]
        if outside:
            raise ValueError(f"classes {outside} are outside the {role}'s [0, {classes - 1}]")
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

    # ---- the original model's results ----------------------------------------------------
    @override
    def _original_digest(self, pl_module: pl.LightningModule) -> str | None:
        return (state_digest(pl_module.original_unet)
                if hasattr(pl_module, "original_unet") else None)

    @override
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

    @override
    def _to_entry(self, results: dict[str, Any]) -> dict[str, Any]:
        return to_entry(results["samples"], results["likelihood"])

    @override
    def _from_entry(self, entry: dict[str, Any]) -> dict[str, Any]:
        samples, likelihood = from_entry(entry)
        return {"samples": samples, "likelihood": likelihood}

    # ---- what ---------------------------------------------------------------------------
    @override
    def _to_device(self, device: torch.device) -> None:
        self._paired.to(device)

    @override
    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                 original: bool) -> dict[str, Any]:
        """One model's samples and its likelihood of the held-out images."""
        return {"samples": self._sample(trainer, pl_module, original),
                "likelihood": (None if self._held_out is None else
                               self._likelihood(pl_module, original))}

    def _sample(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                original: bool) -> Tensor:
        """All ``num_samples`` samples, in order: rank r draws samples r, r + W, ... and they
        are gathered. A label-conditional model draws sample i with label i mod C, whatever
        the rank or batch."""
        world, rank = trainer.world_size, trainer.global_rank
        shape = tuple(pl_module.sample_shape)
        noise = seeded_noise(self.num_samples, shape, self.seed)
        mine = noise[rank::world]
        labels = None
        if self._conditional(pl_module):
            labels = (torch.arange(self.num_samples) % pl_module.num_classes)[rank::world]
        samples = torch.zeros(self.num_samples, *shape)
        for index in torch.arange(len(mine)).split(self.batch_size):
            chunk = mine[index]
            kwargs = {} if labels is None else {"labels": labels[index]}
            images = pl_module.sample_from(chunk.to(pl_module.device), original=original,
                                           num_steps=self.num_steps, **kwargs)
            if tuple(images.shape) != tuple(chunk.shape):
                raise ValueError(f"sample_from returned shape {tuple(images.shape)} for noise "
                                 f"of shape {tuple(chunk.shape)}")
            samples[rank + world * index] = images.float().cpu()
        return self._gather(trainer, pl_module.device, samples)[0]

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

    @override
    def _compare(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                 original: dict[str, Any], unlearned: dict[str, Any]
                 ) -> tuple[dict[str, float], dict[str, Any]]:
        paired = self._paired.compare(original["samples"], unlearned["samples"])
        likelihood = None
        if self._held_out is not None:
            likelihood = likelihood_change(original["likelihood"], unlearned["likelihood"])
        inception = self._inception_scores(original["samples"], unlearned["samples"],
                                           pl_module.device)
        primary = paired["evaluators"]["classifier"]
        details = {
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
        return self._metrics(paired, likelihood, inception), details

    @staticmethod
    def _metrics(paired: dict[str, Any], likelihood: dict[str, Any] | None,
                 inception: dict[str, Any] | None) -> dict[str, float]:
        """The scalar measures, flat, as logged and as in the report's table."""
        primary = paired["evaluators"]["classifier"]
        metrics = {
            "pul": primary["pul"],
            **u_fid_metrics(primary["u_fid_name"], primary["u_fid_original"],
                            primary["u_fid"]),
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

    def _inception_scores(self, original: Tensor, unlearned: Tensor,
                          device: torch.device) -> dict[str, Any] | None:
        if self._inception is None:
            return None
        fid = self._inception.to(device)
        fid_o, fid_u = (sample_fid(fid, images, self.batch_size)
                        for images in (original, unlearned))
        return {"name": fid.name, "u_fid_original": fid_o, "u_fid": fid_u,
                "u_fid_ratio": u_fid_ratio(fid_o, fid_u)}

    # ---- output -------------------------------------------------------------------------
    @override
    def _write_pictures(self, trainer: pl.Trainer, out: Path, results: dict[str, Any],
                        original: dict[str, Any], unlearned: dict[str, Any]) -> None:
        """The class histograms and the captioned before/after grid."""
        step = trainer.global_step
        try:
            save_histogram(out / f"histogram_step_{step:07d}.png", results["histograms"][
                "original"], results["histograms"]["unlearned"], results["forget_classes"])
        except ImportError:
            rank_zero_warn("matplotlib is not installed: no histogram PNG (the JSON has it)")
        original, unlearned = original["samples"], unlearned["samples"]
        count = min(self.grid_images, len(original))
        if count == 0:
            return
        primary = self._paired.evaluators["classifier"]
        picture = before_after_grid(
            original[:count], unlearned[:count],
            *(primary.predict(images[:count]) for images in (original, unlearned)),
            self._paired.forget_classes, evaluator="the classifier", tile=self.grid_tile)
        self.write_picture(trainer, picture, out,
                           f"left original, right unlearned; step {step}, seed {self.seed}; "
                           "captions: label and confidence; red: originals of a forgotten "
                           "class")
