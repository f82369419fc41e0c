"""``TextToImageEvaluation``: PUL, CLIP score, u-FID and grids for feature unlearning
(docs/method.md §5).

The text-to-image counterpart of ``UnlearningEvaluation``: instead of a classifier over
classes, a *concept detector* the user supplies says in which images the concept is present;
instead of noises, prompts and seeds. Image (prompt p, seed s) is drawn by the original and by
the unlearned pipeline from the same CPU generator seeded s, so the two sets are paired. The
original model never changes: its scores, its FID and its grid images are computed once and
kept; later evaluations generate only with the unlearned model. What every evaluation callback
shares is ``EvaluationCallback``'s.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from typing_extensions import override

from vdu_lightning.callbacks.evaluation_base import (
    EvaluationCallback,
    _positive,
    u_fid_metrics,
)
from vdu_lightning.callbacks.samples import image_grid
from vdu_lightning.data.folder import CaptionedImageFolder
from vdu_lightning.metrics import PromptCLIPScore, UnlearnedFID, clip_scores, percent_unlearned

__all__ = ["TextToImageEvaluation", "clip_scores", "load_clip", "load_detector",
           "sampler_name"]


def load_detector(path: str, args: dict[str, Any] | None = None) -> Callable[[Tensor], Tensor]:
    """The concept detector named by ``path`` ("package.module.Name").

    A class (an ``nn.Module`` or any class with ``__call__``) is instantiated with ``args``;
    a function is used as it is. An ``nn.Module`` is frozen in eval mode.

    Raises:
        ImportError: the module cannot be imported or has no such name.
        TypeError: the object (or the instance of the class) is not callable, or ``args`` were
            given for a function.
    """
    module_name, _, name = path.rpartition(".")
    if not module_name:
        raise ImportError(f"detector {path!r} is not an import path: expected "
                          "'package.module.Name' (a class or a function)")
    try:
        found = getattr(importlib.import_module(module_name), name)
    except ImportError as err:
        raise ImportError(f"detector {path!r}: cannot import {module_name!r} ({err})") from err
    except AttributeError as err:
        raise ImportError(f"detector {path!r}: {module_name!r} has no {name!r}") from err
    if isinstance(found, type):
        detector = found(**(args or {}))
    elif args:
        raise TypeError(f"detector_args {args!r} given, but the detector {path!r} is not a "
                        "class: only a class takes arguments")
    else:
        detector = found
    if not callable(detector):
        raise TypeError(f"detector {path!r} is a {type(detector).__name__}, not callable: "
                        "expected an nn.Module class, a class with __call__, or a function "
                        "taking images [B, 3, H, W] in [0, 1] and returning scores [B]")
    if isinstance(detector, nn.Module):
        detector.requires_grad_(False).eval()
    return detector


def sampler_name(pipeline_dir: str | os.PathLike) -> str:
    """The pipeline's scheduler as a short name (``PNDMScheduler`` -> ``pndm``), for FID names."""
    config = Path(pipeline_dir) / "scheduler" / "scheduler_config.json"
    name = json.loads(config.read_text())["_class_name"]
    return name.removesuffix("Scheduler").lower()


def load_clip(path: str | os.PathLike) -> tuple[nn.Module, Any]:
    """A CLIP model and processor from a local directory, frozen; nothing is downloaded."""
    from transformers import CLIPModel, CLIPProcessor  # slow import: only when asked for

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"clip_model directory not found or not a CLIP model: {path} "
                                "(expected a directory written by CLIPModel.save_pretrained and "
                                "CLIPProcessor.save_pretrained)")
    model = CLIPModel.from_pretrained(path, local_files_only=True)
    processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
    return model.requires_grad_(False).eval(), processor


class TextToImageEvaluation(EvaluationCallback):
    """Evaluate feature unlearning on ``vdu validate`` / ``vdu test``: PUL, CLIP score, u-FID,
    side-by-side grids.

    For each prompt and each seed 0..n-1 the original and the unlearned pipeline
    (``TextToImageVDUModule.pipeline``) make one image from the same noise. The detector scores
    each image of ``prompts``; the concept is present where score > ``threshold``, which gives
    n_orig and n_unl and PUL = 100 · (n_orig − n_unl) / n_orig (null when n_orig = 0).

    The detector contract: called on images ``[B, 3, H, W]`` float in [0, 1] (on the module's
    device, under ``torch.no_grad``), it returns scores ``[B]``.

    Logged (the same values on every rank): ``eval/pul``, ``eval/n_original``,
    ``eval/n_unlearned``; with ``clip_model``: ``eval/clip_score/forget/{original,unlearned}``
    (and ``.../retain/...`` with ``retain_prompts``); with ``reference_folder``:
    ``eval/<fid name>`` (e.g. ``u_fid/classifier/pndm50``: features, sampler, steps),
    ``eval/original/<fid name>`` and ``eval/u_fid_ratio``. u-FID compares the images of
    ``retain_prompts`` (those of ``prompts`` when there are none) with the reference folder.
    The CLIP score is ``PromptCLIPScore``, equal to torchmetrics' ``CLIPScore``: the mean
    over images of 100 · cos(image, prompt), clipped at 0. Rank 0 writes
    ``evaluation_step_XXXXXXX.json`` (metrics, per-image detector and CLIP scores, settings)
    and ``samples_step_XXXXXXX.png`` (left original, right unlearned; a row per grid prompt, a
    column per seed) to ``dirpath``, and logs the grid to W&B (``eval/samples``) or
    TensorBoard. The last results stay in ``self.results``.

    DDP: image k (prompt k // n, seed k % n, over ``prompts`` then ``retain_prompts``) is
    made by rank k mod world_size, so the work is shared. Per-image scores and grid images go
    into full-length zero tensors summed across ranks (``EvaluationCallback._gather``), and
    the CLIP score's means are taken over them; FID statistics sync through the metric: every
    rank reaches the same collectives in the same order, so no rank waits for one that
    skipped them, and every rank ends with the same results (equal to
    one process's up to the rounding of other batch compositions; checked once by hand with
    2 CPU ranks: the same detector scores and grid, CLIP and FID within 1e-5). Every rank
    needs at least one image of each prompt list (refused at setup otherwise).

    Args:
        prompts: prompts that show the concept (PUL and the forget CLIP score).
        detector: import path of the concept detector: an ``nn.Module`` class, another class
            with ``__call__``, or a function.
        detector_args: keyword arguments of the detector's class.
        threshold: the concept is present where the detector's score exceeds it.
        images_per_prompt: n; seeds 0..n-1, the same for both models.
        num_inference_steps, guidance_scale: as in ``StableDiffusionPipeline.__call__``.
        batch_size: images per pipeline call (and per detector, CLIP and FID pass).
        clip_model: a local directory with a CLIP model and processor (``save_pretrained``).
        retain_prompts: prompts whose images should stay good (CLIP score, u-FID).
        reference_folder: real images (``CaptionedImageFolder``) for u-FID.
        fid_classifier: a ``ClassifierModule.save_pretrained`` directory (3-channel) whose
            features FID uses; or
        inception_weights: a local Inception-v3 weights file (needs torch-fidelity).
        grid_prompts: the prompts shown in the grid (each one of ``prompts`` or
            ``retain_prompts``; default: all).
        grid_seeds: seeds shown per prompt (the first ones; 0: no grid).
        dirpath: where files go; default ``<trainer.log_dir>/evaluation``.
        during_fit: also evaluate at fit's validations, never in the sanity check.

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: vdu_lightning.callbacks.TextToImageEvaluation
              init_args:
                prompts: ["a painting by Van Gogh"]
                detector: my_package.detectors.VanGoghDetector
                clip_model: models/clip-vit-large-patch14
    """

    def __init__(
        self,
        prompts: list[str],
        detector: str,
        detector_args: dict[str, Any] | None = None,
        threshold: float = 0.5,
        images_per_prompt: int = 10,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        batch_size: int = 8,
        clip_model: str | None = None,
        retain_prompts: list[str] | None = None,
        reference_folder: str | None = None,
        fid_classifier: str | None = None,
        inception_weights: str | None = None,
        grid_prompts: list[str] | None = None,
        grid_seeds: int = 4,
        dirpath: str | None = None,
        during_fit: bool = False,
    ) -> None:
        if not prompts:
            raise ValueError("prompts is empty: give the prompts that show the concept")
        texts = list(prompts) + list(retain_prompts or [])
        if not all(isinstance(p, str) and p.strip() for p in texts):
            raise ValueError(f"prompts and retain_prompts must be non-empty texts, got {texts!r}")
        _positive("images_per_prompt", images_per_prompt)
        _positive("num_inference_steps", num_inference_steps)
        _positive("batch_size", batch_size)
        _positive("grid_seeds", grid_seeds, 0)
        if (reference_folder is None) != (fid_classifier is None and inception_weights is None):
            raise ValueError("u-FID needs reference_folder and one feature source "
                             "(fid_classifier or inception_weights); got reference_folder="
                             f"{reference_folder!r}, fid_classifier={fid_classifier!r}, "
                             f"inception_weights={inception_weights!r}")
        if fid_classifier is not None and inception_weights is not None:
            raise ValueError("give one FID feature source, fid_classifier or inception_weights, "
                             "not both")
        self.prompts = list(prompts)
        self.retain_prompts = list(retain_prompts or [])
        every = self.prompts + self.retain_prompts
        unknown = [p for p in grid_prompts or [] if p not in every]
        if unknown:
            raise ValueError(f"grid_prompts {unknown} are not among prompts or retain_prompts: "
                             "the grid shows images the evaluation makes anyway")
        self.detector = detector
        self.detector_args = dict(detector_args or {})
        self.threshold = float(threshold)
        self.images_per_prompt = images_per_prompt
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = float(guidance_scale)
        self.batch_size = batch_size
        self.clip_model = clip_model
        self.reference_folder = reference_folder
        self.fid_classifier = fid_classifier
        self.inception_weights = inception_weights
        self.grid_prompts = list(grid_prompts) if grid_prompts is not None else every
        self.grid_seeds = min(grid_seeds, images_per_prompt)
        super().__init__(dirpath, during_fit)
        self._fid: UnlearnedFID | None = None
        self._clip: PromptCLIPScore | None = None

    # ---- which image is which ---------------------------------------------------------------
    @property
    def _num_forget(self) -> int:
        """Images of ``prompts``: k < _num_forget; those of ``retain_prompts`` follow."""
        return len(self.prompts) * self.images_per_prompt

    @property
    def _num_images(self) -> int:
        return (len(self.prompts) + len(self.retain_prompts)) * self.images_per_prompt

    def _prompt_of(self, k: int) -> str:
        return (self.prompts + self.retain_prompts)[k // self.images_per_prompt]

    def _fid_images(self) -> range:
        return (range(self._num_forget, self._num_images) if self.retain_prompts
                else range(self._num_forget))

    def _grid_images(self) -> list[int]:
        """Row by row (a grid prompt each), the first ``grid_seeds`` seeds."""
        every = self.prompts + self.retain_prompts
        return [every.index(p) * self.images_per_prompt + s
                for p in self.grid_prompts for s in range(self.grid_seeds)]

    # ---- setup: every check before any generation --------------------------------------------
    @override
    def _check_module(self, pl_module: pl.LightningModule) -> None:
        if not callable(getattr(pl_module, "pipeline", None)) or "pretrained" not in getattr(
                pl_module, "hparams", {}):
            raise TypeError(f"TextToImageEvaluation needs a text-to-image module such as "
                            f"TextToImageVDUModule: its pipeline(original=...) makes the images "
                            f"and hparams.pretrained names the pipeline directory; "
                            f"{type(pl_module).__name__} lacks them")

    @override
    def _check_run(self, trainer: pl.Trainer) -> None:
        world = trainer.world_size
        for name, count in (("prompts", self._num_forget),
                            ("retain_prompts", len(self.retain_prompts) * self.images_per_prompt)):
            if 0 < count < world:
                raise ValueError(f"{name} × images_per_prompt gives {count} images for "
                                 f"{world} processes: each needs at least one")

    @override
    def _load(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._detector = load_detector(self.detector, self.detector_args)
        self._clip = None
        if self.clip_model is not None:
            # Every rank scores its share and the per-image scores are gathered before the
            # means are taken: no syncing.
            self._clip = PromptCLIPScore(*load_clip(self.clip_model), sync_on_compute=False)
        if self.reference_folder is not None:
            self._fid = self._build_fid(pl_module)
            self._reference = self._reference_images(tuple(pl_module.sample_shape), trainer)

    def _build_fid(self, pl_module: pl.LightningModule) -> UnlearnedFID:
        sampler = sampler_name(pl_module.hparams.pretrained)
        if self.inception_weights is not None:
            return UnlearnedFID(inception_weights=self.inception_weights, sampler=sampler,
                                num_steps=self.num_inference_steps)
        classifier = self._load_classifier(self.fid_classifier, "fid_classifier", 3,
                                           "the pipeline makes RGB images")
        return UnlearnedFID(classifier=classifier, sampler=sampler,
                            num_steps=self.num_inference_steps)

    def _reference_images(self, shape: tuple[int, ...],
                          trainer: pl.Trainer) -> tuple[CaptionedImageFolder, list[int]]:
        """The reference folder (at the pipeline's size) and this rank's share of it."""
        try:
            folder = CaptionedImageFolder(self.reference_folder, image_size=shape[1])
        except FileNotFoundError as err:
            raise FileNotFoundError(f"reference_folder: {err}") from err
        if len(folder) < 2 or len(folder) < trainer.world_size:
            raise ValueError(f"reference_folder {self.reference_folder} holds {len(folder)} "
                             f"images; FID needs at least 2 (and one per process)")
        return folder, list(range(trainer.global_rank, len(folder), trainer.world_size))

    def _reference_batches(self) -> Iterator[Tensor]:
        """This rank's reference images, ``batch_size`` at a time."""
        folder, indices = self._reference
        for start in range(0, len(indices), self.batch_size):
            chunk = indices[start:start + self.batch_size]
            yield torch.stack([folder.load_image(i) for i in chunk])

    # ---- what ---------------------------------------------------------------------------------
    @override
    def _to_device(self, device: torch.device) -> None:
        if isinstance(self._detector, nn.Module):
            self._detector.to(device)
        if self._clip is not None:
            self._clip.to(device)

    @override
    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                 original: bool) -> dict[str, Any]:
        if original and self._fid is not None:
            # The real statistics are made with the original's results (once per setup), and
            # made anew if an evaluation failed before those were kept.
            self._fill_reference(self._fid, self._reference_batches(), pl_module.device)
        return self._generate_and_score(trainer, pl_module, original)

    def _generate_and_score(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                            original: bool) -> dict[str, Any]:
        """Detector and CLIP scores of every image, the FID, the grid images: this rank makes
        images k ≡ rank (mod world) and the ranks' results are gathered."""
        device, world = pl_module.device, trainer.world_size
        mine = list(range(trainer.global_rank, self._num_images, world))
        fid_images, grid_images = set(self._fid_images()), self._grid_images()
        detector = torch.zeros(self._num_forget, dtype=torch.float64)
        clip = torch.zeros(self._num_images, dtype=torch.float64)
        shape = tuple(pl_module.sample_shape)
        grid = torch.zeros(len(grid_images), *shape)
        if self._fid is not None:
            self._fid.reset()  # fake statistics left by an evaluation that failed half-way
        pipeline = pl_module.pipeline(original=original)
        pipeline.set_progress_bar_config(disable=True)
        unet, was_training = pipeline.unet, pipeline.unet.training
        unet.eval()  # the unlearned UNet is in train mode during fit
        try:
            for start in range(0, len(mine), self.batch_size):
                chunk = mine[start:start + self.batch_size]
                prompts = [self._prompt_of(k) for k in chunk]
                # CPU generators: the same noise on every device and in every batch.
                generators = [torch.Generator("cpu").manual_seed(k % self.images_per_prompt)
                              for k in chunk]
                images = pipeline(prompts, num_inference_steps=self.num_inference_steps,
                                  guidance_scale=self.guidance_scale, generator=generators,
                                  output_type="pt").images.float().to(device)
                forget = [i for i, k in enumerate(chunk) if k < self._num_forget]
                if forget:
                    detector[[chunk[i] for i in forget]] = self._detect(images[forget])
                if self._clip is not None:
                    clip[chunk] = self._clip.image_scores(images, prompts)
                for_fid = [i for i, k in enumerate(chunk) if k in fid_images]
                if self._fid is not None and for_fid:
                    self._fid.update(images[for_fid] * 2 - 1, real=False)
                for row, k in enumerate(grid_images):
                    if k in chunk:
                        grid[row] = images[chunk.index(k)].cpu()
        finally:
            unet.train(was_training)
            del pipeline
        fid = None
        if self._fid is not None:
            fid = float(self._fid.compute())  # a collective: FID syncs its statistics
            self._fid.reset()  # the fake statistics only; the real ones are kept
        detector, clip, grid = self._gather(trainer, device, detector, clip, grid)
        return {"detector": detector, "clip": clip, "fid": fid, "grid": grid}

    @torch.no_grad()
    def _detect(self, images: Tensor) -> Tensor:
        scores = torch.as_tensor(self._detector(images))
        if scores.shape != (len(images),):
            raise ValueError(f"the detector {self.detector} returned shape "
                             f"{tuple(scores.shape)} for {len(images)} images; it must return "
                             "one score per image, [B]")
        return scores.detach().double().cpu()

    @override
    def _compare(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                 original: dict[str, Any], unlearned: dict[str, Any]
                 ) -> tuple[dict[str, float], dict[str, Any]]:
        both = (("original", original), ("unlearned", unlearned))
        present = {name: int((result["detector"] > self.threshold).sum())
                   for name, result in both}
        metrics: dict[str, float] = {
            "pul": float(percent_unlearned(present["original"], present["unlearned"])),
            "n_original": float(present["original"]),
            "n_unlearned": float(present["unlearned"]),
        }
        if self._clip is not None:
            parts = {"forget": slice(0, self._num_forget)}
            if self.retain_prompts:
                parts["retain"] = slice(self._num_forget, None)
            for part, where in parts.items():
                for name, result in both:
                    metrics[f"clip_score/{part}/{name}"] = self._mean_clip(result["clip"][where])
        if self._fid is not None:
            metrics.update(u_fid_metrics(self._fid.name, original["fid"], unlearned["fid"]))
        n = self.images_per_prompt
        details = {
            "prompts": self.prompts,
            "retain_prompts": self.retain_prompts,
            "images_per_prompt": n,
            "seeds": list(range(n)),
            "detector": self.detector,
            "detector_args": self.detector_args,
            "threshold": self.threshold,
            # [prompt][seed]: whoever doubts a number can look at the scores behind it.
            "detector_scores": {name: result["detector"].view(-1, n).tolist()
                                for name, result in both},
            # [prompt][seed] over prompts then retain_prompts, before the mean and its clip.
            "clip_scores": ({name: result["clip"].view(-1, n).tolist() for name, result in both}
                            if self._clip is not None else None),
            "sampler": sampler_name(pl_module.hparams.pretrained),
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "clip_model": self.clip_model,
            "fid_name": self._fid.name if self._fid is not None else None,
            "features": self._fid.feature_kind if self._fid is not None else None,
            "reference_folder": self.reference_folder,
            "num_reference": len(self._reference[0]) if self._fid is not None else None,
        }
        return metrics, details

    def _mean_clip(self, scores: Tensor) -> float:
        """``PromptCLIPScore`` of images already scored one by one (those of every rank)."""
        self._clip.reset()
        self._clip.update(scores=scores)
        return float(self._clip.compute())

    # ---- output ---------------------------------------------------------------------------
    @override
    def _write_pictures(self, trainer: pl.Trainer, out: Path, results: dict[str, Any],
                        original: dict[str, Any], unlearned: dict[str, Any]) -> None:
        """Original left, unlearned right: a row per grid prompt, a column per seed."""
        if len(original["grid"]) == 0:
            return
        # image_grid takes [-1, 1].
        self.write_side_by_side(
            trainer, image_grid(original["grid"] * 2 - 1, nrow=self.grid_seeds),
            image_grid(unlearned["grid"] * 2 - 1, nrow=self.grid_seeds), out,
            f"left original, right unlearned; rows: {'; '.join(self.grid_prompts)}; "
            f"seeds 0-{self.grid_seeds - 1}; step {trainer.global_step}")
