"""Unlearning on Stable-Diffusion-style pipelines: the modules (``module.py``), local pipeline
directories (``pipelines.py``), a forget set made by the model (``forget_set.py``) and the
evaluation with a user's detector and CLIP (``evaluation.py``). See README.md here."""

from vdu_lightning._lazy import lazy_namespace

_NAMES = {
    "TextToImageFinetuneModule": "vdu_lightning.methods.text_to_image.module",
    "TextToImageVDUModule": "vdu_lightning.methods.text_to_image.module",
    "TextToImageEvaluation": "vdu_lightning.methods.text_to_image.evaluation",
    "generate_forget_set": "vdu_lightning.methods.text_to_image.forget_set",
    "load_pipeline": "vdu_lightning.methods.text_to_image.pipelines",
    "save_pipeline": "vdu_lightning.methods.text_to_image.pipelines",
}
__getattr__, __dir__ = lazy_namespace(__name__, _NAMES)
__all__ = sorted(_NAMES)
