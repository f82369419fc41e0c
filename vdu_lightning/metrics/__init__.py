"""Unlearning metrics as torchmetrics ``Metric`` classes: PUL and u-FID (shared/method.md §4)."""

from vdu_lightning.metrics.fid import ClassifierFeatures, InceptionFeatures, UnlearnedFID
from vdu_lightning.metrics.pul import PercentUnlearned, class_histogram, percent_unlearned

__all__ = [
    "ClassifierFeatures",
    "InceptionFeatures",
    "PercentUnlearned",
    "UnlearnedFID",
    "class_histogram",
    "percent_unlearned",
]
