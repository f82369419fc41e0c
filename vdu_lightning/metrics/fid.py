"""u-FID: FID between samples of a model and real images of the retained classes.

``UnlearnedFID`` is torchmetrics' ``FrechetInceptionDistance`` (its maths, float64 states and
DDP syncing) with one of two feature extractors that never download anything:

* ``InceptionFeatures``: Inception-v3 (pool3, 2048-d) from a local weights file, the usual
  FID features; needs the ``torch-fidelity`` package.
* ``ClassifierFeatures``: the penultimate layer of an evaluation classifier
  (``evaluation.ClassifierNet``: intensity-standardised, so a global haze barely moves it),
  for machines and data sets without Inception weights. Such values compare only with
  values from the same classifier.

Both take images in [-1, 1]. FID needs at least 2 samples per side (torchmetrics raises
otherwise), and the covariance of d-dimensional features has full rank only with more than d
samples: use N well above ``num_features`` (2048 for Inception) for values worth comparing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.utilities import rank_zero_warn
from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE
from typing_extensions import override


#: The file torch-fidelity downloads for FID (the TF Inception graph converted to PyTorch).
INCEPTION_WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"


def _check_images(images: Tensor) -> None:
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        dtype = images.dtype if isinstance(images, Tensor) else None
        raise ValueError(f"images must be a float [N, C, H, W] tensor in [-1, 1], got {shape} "
                         f"of dtype {dtype}")


class _Frozen(nn.Module):
    """A feature extractor that never leaves eval mode (BatchNorm statistics stay fixed)."""

    num_features: int

    @override
    def train(self, mode: bool = True) -> "_Frozen":
        return super().train(False)


class ClassifierFeatures(_Frozen):
    """Penultimate-layer features of an evaluation classifier, float32 ``[N, feature_dim]``.

    The classifier (a ``ClassifierNet``, or anything with ``features``, ``feature_dim`` and
    ``in_channels``, such as the ``ClassifierModule`` that trains one) is frozen (eval mode,
    no gradients) and shared, not copied.

    Example:
        >>> from vdu_lightning.evaluation import ClassifierNet
        >>> features = ClassifierFeatures(ClassifierNet(in_channels=1, width=8))
        >>> features.num_features, features(torch.zeros(3, 1, 8, 8)).shape
        (32, torch.Size([3, 32]))
    """

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        missing = [name for name in ("features", "feature_dim", "in_channels")
                   if not hasattr(classifier, name)]
        if not isinstance(classifier, nn.Module) or missing:
            raise TypeError(f"classifier must be a ClassifierNet (an nn.Module with features, "
                            f"feature_dim and in_channels), got {type(classifier).__name__}")
        self.classifier = classifier.requires_grad_(False).eval()
        self.num_features = classifier.feature_dim

    @override
    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        _check_images(images)
        channels = self.classifier.in_channels
        if images.shape[1] != channels:
            raise ValueError(f"the classifier takes {channels}-channel images, got "
                             f"{images.shape[1]} channels")
        # FID statistics are float64 sums: features from an autocast bf16 pass would lose
        # most of their precision before they get there.
        with torch.autocast(images.device.type, enabled=False):
            return self.classifier.features(images.float()).float()


def _build_inception(weights_path: str, feature: int) -> nn.Module:
    """torchmetrics' Inception-v3 (torch-fidelity's network) from a local weights file."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    return NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(feature)],
                              feature_extractor_weights_path=weights_path)


class InceptionFeatures(_Frozen):
    """Inception-v3 FID features of images in [-1, 1], loaded from a local weights file.

    Grey images are repeated to 3 channels and converted to the uint8 [0, 255] images the
    network expects (it resizes them to 299 × 299 itself).

    Args:
        weights_path: torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``.
        feature: the layer: 64, 192, 768 or 2048 (pool3, the standard FID features).

    Raises:
        FileNotFoundError: ``weights_path`` is not a file.
        ImportError: ``torch-fidelity`` is not installed.

    Example:
        >>> features = InceptionFeatures("weights/" + INCEPTION_WEIGHTS_NAME)  # doctest: +SKIP
        >>> features(torch.zeros(2, 1, 28, 28)).shape  # doctest: +SKIP
        torch.Size([2, 2048])
    """

    def __init__(self, weights_path: str | os.PathLike, feature: int = 2048) -> None:
        super().__init__()
        if feature not in (64, 192, 768, 2048):
            raise ValueError(f"feature must be one of 64, 192, 768, 2048, got {feature!r}")
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"Inception weights file not found: {path} (expected torch-fidelity's "
                f"{INCEPTION_WEIGHTS_NAME}; without it, use the classifier's features)"
            )
        if not _TORCH_FIDELITY_AVAILABLE:
            raise ImportError("Inception features need the torch-fidelity package: "
                              "pip install torch-fidelity (or torchmetrics[image])")
        self.inception = _build_inception(str(path), feature)
        self.num_features = feature

    @override
    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        _check_images(images)
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        if images.shape[1] != 3:
            raise ValueError(f"Inception takes grey or RGB images, got {images.shape[1]} "
                             f"channels")
        pixels = ((images.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
        with torch.autocast(images.device.type, enabled=False):
            return self.inception(pixels).float()


class UnlearnedFID(FrechetInceptionDistance):
    """FID of generated samples against real retained-class images, named by what it used.

    Give exactly one feature source. The real statistics survive ``reset()``
    (``reset_real_features=False``): the reference images are fixed, only the samples change.

    Args:
        classifier: use this classifier's penultimate features (a ``ClassifierNet``).
        inception_weights: use Inception-v3 from this local weights file.
        sampler: the sampler that made the fake images (recorded in ``name``).
        num_steps: its number of steps (recorded in ``name``).
        **kwargs: ``FrechetInceptionDistance``/``Metric`` arguments (``reset_real_features``,
            ``sync_on_compute``, ...), but not ``feature``.

    Example:
        >>> from vdu_lightning.evaluation import ClassifierNet
        >>> fid = UnlearnedFID(classifier=ClassifierNet(in_channels=1, width=8))
        >>> fid.name
        'u_fid/classifier/ddim50'
        >>> fid.update(torch.rand(40, 1, 8, 8) * 2 - 1, real=True)
        >>> fid.update(torch.rand(40, 1, 8, 8) * 2 - 1, real=False)
        >>> bool(fid.compute() >= 0)
        True
    """

    def __init__(
        self,
        classifier: nn.Module | None = None,
        inception_weights: str | os.PathLike | None = None,
        sampler: str = "ddim",
        num_steps: int = 50,
        **kwargs: Any,
    ) -> None:
        if (classifier is None) == (inception_weights is None):
            raise ValueError("give exactly one feature source: classifier (a ClassifierNet) "
                             "or inception_weights (a local Inception weights file); got "
                             f"classifier={type(classifier).__name__}, "
                             f"inception_weights={inception_weights!r}")
        if "feature" in kwargs:
            raise TypeError("UnlearnedFID chooses its features itself: pass classifier or "
                            "inception_weights instead of feature")
        if not isinstance(sampler, str) or not sampler or "/" in sampler:
            raise ValueError(f"sampler must be a non-empty name without '/', got {sampler!r}")
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
        if classifier is not None:
            feature: _Frozen = ClassifierFeatures(classifier)
            kind = "classifier"
        else:
            feature = InceptionFeatures(inception_weights)
            kind = "inception"
        kwargs.setdefault("reset_real_features", False)
        # A module with `num_features` spares torchmetrics its dummy 299×299 uint8 forward;
        # `normalize` then only says that the inputs are float (they go to the module as-is).
        super().__init__(feature=feature, normalize=True, **kwargs)
        self.feature_kind = kind
        self.sampler = sampler
        self.num_steps = num_steps
        # torchmetrics sets this in update(); a rank or a copy that computes without having
        # updated itself would otherwise fail on it. Our extractors give float32.
        self.orig_dtype = torch.float32

    @property
    def name(self) -> str:
        """``u_fid/<features>/<sampler><steps>``, e.g. ``u_fid/inception/ddim50``."""
        return f"u_fid/{self.feature_kind}/{self.sampler}{self.num_steps}"

    def update(self, images: Tensor, real: bool) -> None:
        """Add images in [-1, 1] (``[N, C, H, W]``) to the real or the fake statistics."""
        _check_images(images)
        super().update(images, real=real)

    def compute(self) -> Tensor:
        """The FID (float32); warns when a covariance cannot have full rank."""
        fewest = int(min(self.real_features_num_samples, self.fake_features_num_samples))
        if 2 <= fewest <= self.inception.num_features:
            rank_zero_warn(f"{self.name}: {fewest} samples for {self.inception.num_features}-d "
                           "features give a rank-deficient covariance; the value is biased and "
                           "comparable only with values from as many samples")
        return super().compute()
