"""vdu_lightning: machine unlearning for diffusion models, as PyTorch Lightning parts.

The public names below are imported on first use, so ``import vdu_lightning.prior`` (or
``losses``, ``diffusion``, the metrics, the evaluation, a method's maths) loads no Lightning.
Where things live: see the README's "Layout" section.
"""

from vdu_lightning._lazy import install_moved_modules, lazy_namespace

__version__ = "0.1.0"

#: Each public name and the module that defines it.
_PUBLIC = {
    "ClassifierModule": "vdu_lightning.modules.classifier",
    "DiffusionModule": "vdu_lightning.modules.diffusion",
    "UnlearningModule": "vdu_lightning.modules.unlearning",
    "PriorPenaltyModule": "vdu_lightning.modules.prior_penalty",
    "VDUModule": "vdu_lightning.methods.vdu.module",
    "EWCModule": "vdu_lightning.methods.peers.ewc",
    "GradientAscentModule": "vdu_lightning.methods.peers.gradient_ascent",
    "IsotropicAnchorModule": "vdu_lightning.methods.peers.anchor",
    "RetainFinetuneModule": "vdu_lightning.methods.peers.retain",
    "SalUnModule": "vdu_lightning.methods.peers.salun",
    "SFDModule": "vdu_lightning.methods.sfd.module",
    "TextToImageSFDModule": "vdu_lightning.methods.sfd.text_to_image",
    "TextToImageFinetuneModule": "vdu_lightning.methods.text_to_image.module",
    "TextToImageVDUModule": "vdu_lightning.methods.text_to_image.module",
    "ForgetSetDataModule": "vdu_lightning.data.datamodules",
    "ImageDataModule": "vdu_lightning.data.datamodules",
    "ParameterPrior": "vdu_lightning.prior",
}

#: Modules that moved, by their old path: importable there, with a warning, for one release.
_MOVED_MODULES = {
    "vdu_lightning.modules.vdu": "vdu_lightning.methods.vdu.module",
    "vdu_lightning.modules.peers": "vdu_lightning.methods.peers",
    "vdu_lightning.modules.peers.anchor": "vdu_lightning.methods.peers.anchor",
    "vdu_lightning.modules.peers.ewc": "vdu_lightning.methods.peers.ewc",
    "vdu_lightning.modules.peers.gradient_ascent": "vdu_lightning.methods.peers.gradient_ascent",
    "vdu_lightning.modules.peers.retain": "vdu_lightning.methods.peers.retain",
    "vdu_lightning.modules.peers.salun": "vdu_lightning.methods.peers.salun",
    "vdu_lightning.fisher": "vdu_lightning.methods.peers.fisher",
    "vdu_lightning.modules.sfd": "vdu_lightning.methods.sfd.module",
    "vdu_lightning.score_distillation": "vdu_lightning.methods.sfd.score_distillation",
    "vdu_lightning.one_step": "vdu_lightning.methods.sfd.one_step",
    "vdu_lightning.modules.text_to_image": "vdu_lightning.methods.text_to_image.module",
    "vdu_lightning.pipelines": "vdu_lightning.methods.text_to_image.pipelines",
    "vdu_lightning.callbacks.text_to_image": "vdu_lightning.methods.text_to_image.evaluation",
    "vdu_lightning.forget_set": "vdu_lightning.methods.text_to_image.forget_set",
}

install_moved_modules(_MOVED_MODULES)
__getattr__, __dir__ = lazy_namespace(__name__, _PUBLIC)
__all__ = [*sorted(_PUBLIC), "__version__"]
