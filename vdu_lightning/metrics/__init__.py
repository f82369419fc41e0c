"""Unlearning metrics as torchmetrics ``Metric`` classes: PUL and u-FID (docs/method.md §4),
and the CLIP score of images against their prompts (docs/method.md §5)."""

from vdu_lightning.metrics.clip import PromptCLIPScore, clip_scores
from vdu_lightning.metrics.fid import ClassifierFeatures, InceptionFeatures, UnlearnedFID
from vdu_lightning.metrics.pul import PercentUnlearned, class_histogram, percent_unlearned

__all__ = [
    "ClassifierFeatures",
    "InceptionFeatures",
    "PercentUnlearned",
    "PromptCLIPScore",
    "UnlearnedFID",
    "class_histogram",
    "clip_scores",
    "percent_unlearned",
]
