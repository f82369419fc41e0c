"""Callbacks: the checkpoint prior, sample grids, evaluation (class-based and text-to-image), the
NaN guard, model export."""

from vdu_lightning.callbacks.evaluation import UnlearningEvaluation
from vdu_lightning.callbacks.export import ExportPretrained
from vdu_lightning.callbacks.guard import NonFiniteLossError, UnlearningGuard
from vdu_lightning.callbacks.prior import CheckpointPrior, PriorSnapshot
from vdu_lightning.callbacks.samples import SampleGridLogger
from vdu_lightning.callbacks.text_to_image import TextToImageEvaluation

__all__ = [
    "CheckpointPrior",
    "ExportPretrained",
    "NonFiniteLossError",
    "PriorSnapshot",
    "SampleGridLogger",
    "TextToImageEvaluation",
    "UnlearningEvaluation",
    "UnlearningGuard",
]
