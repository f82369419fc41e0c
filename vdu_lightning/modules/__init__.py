"""The LightningModules every method builds on: DDPM pre-training (``DiffusionModule``),
the evaluation classifier (``ClassifierModule``), the unlearning base (``UnlearningModule``)
and the prior-penalty base (``PriorPenaltyModule``). The methods themselves live in
``vdu_lightning.methods``, one folder each."""

from vdu_lightning._lazy import lazy_namespace

_NAMES = {
    "ClassifierModule": "vdu_lightning.modules.classifier",
    "DiffusionModule": "vdu_lightning.modules.diffusion",
    "PriorPenaltyModule": "vdu_lightning.modules.prior_penalty",
    "UnlearningModule": "vdu_lightning.modules.unlearning",
}
#: Names this package exported before the methods got folders of their own.
_MOVED = {
    "VDUModule": "vdu_lightning.methods.vdu",
    "EWCModule": "vdu_lightning.methods.peers",
    "GradientAscentModule": "vdu_lightning.methods.peers",
    "IsotropicAnchorModule": "vdu_lightning.methods.peers",
    "RetainFinetuneModule": "vdu_lightning.methods.peers",
    "SalUnModule": "vdu_lightning.methods.peers",
    "SFDModule": "vdu_lightning.methods.sfd",
    "TextToImageFinetuneModule": "vdu_lightning.methods.text_to_image",
    "TextToImageVDUModule": "vdu_lightning.methods.text_to_image",
}
__getattr__, __dir__ = lazy_namespace(__name__, _NAMES, _MOVED)
__all__ = sorted(_NAMES)
