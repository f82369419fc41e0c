"""Score Forgetting Distillation: the iteration both modules share (``distillation.py``),
``SFDModule`` on class labels (``module.py``), ``TextToImageSFDModule`` on prompts
(``text_to_image.py``), the maths (``score_distillation.py``) and the exported one-step
pipelines (``one_step.py``). See README.md in this folder."""

from vdu_lightning._lazy import lazy_namespace

_NAMES = {
    "SFDModule": "vdu_lightning.methods.sfd.module",
    "TextToImageSFDModule": "vdu_lightning.methods.sfd.text_to_image",
    "ScoreDistillationModule": "vdu_lightning.methods.sfd.distillation",
    "OneStepGeneratorPipeline": "vdu_lightning.methods.sfd.one_step",
    "OneStepTextToImagePipeline": "vdu_lightning.methods.sfd.one_step",
    "one_step_images": "vdu_lightning.methods.sfd.one_step",
    "fake_score_loss": "vdu_lightning.methods.sfd.score_distillation",
    "sid_generator_loss": "vdu_lightning.methods.sfd.score_distillation",
    "x0_from_epsilon": "vdu_lightning.methods.sfd.score_distillation",
}
__getattr__, __dir__ = lazy_namespace(__name__, _NAMES)
__all__ = sorted(_NAMES)
