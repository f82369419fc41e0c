"""Callbacks: the checkpoint prior, sample grids, evaluation, the NaN guard, model export."""

from vdu_lightning.callbacks.evaluation import UnlearningEvaluation
from vdu_lightning.callbacks.export import ExportPretrained
from vdu_lightning.callbacks.guard import NonFiniteLossError, UnlearningGuard
from vdu_lightning.callbacks.prior import CheckpointPrior, PriorSnapshot
from vdu_lightning.callbacks.samples import SampleGridLogger

__all__ = [
    "CheckpointPrior",
    "ExportPretrained",
    "NonFiniteLossError",
    "PriorSnapshot",
    "SampleGridLogger",
    "UnlearningEvaluation",
    "UnlearningGuard",
]
