"""Callbacks: the checkpoint prior, sample grids, evaluation (class-based and text-to-image),
the NaN guard, model export."""

from vdu_lightning._lazy import lazy_namespace

_NAMES = {
    "CheckpointPrior": "vdu_lightning.callbacks.prior",
    "ExportPretrained": "vdu_lightning.callbacks.export",
    "NonFiniteLossError": "vdu_lightning.callbacks.guard",
    "PriorSnapshot": "vdu_lightning.callbacks.prior",
    "SampleGridLogger": "vdu_lightning.callbacks.samples",
    "TextToImageEvaluation": "vdu_lightning.methods.text_to_image.evaluation",
    "UnlearningEvaluation": "vdu_lightning.callbacks.evaluation",
    "UnlearningGuard": "vdu_lightning.callbacks.guard",
}
__getattr__, __dir__ = lazy_namespace(__name__, _NAMES)
__all__ = sorted(_NAMES)
