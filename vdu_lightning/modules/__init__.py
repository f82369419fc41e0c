"""LightningModules: DDPM pre-training, the evaluation classifier, VDU (also on
text-to-image models) and its peers."""

from vdu_lightning.modules.classifier import ClassifierModule
from vdu_lightning.modules.diffusion import DiffusionModule
from vdu_lightning.modules.peers import (
    EWCModule,
    GradientAscentModule,
    IsotropicAnchorModule,
    RetainFinetuneModule,
    SalUnModule,
)
from vdu_lightning.modules.sfd import SFDModule
from vdu_lightning.modules.text_to_image import (
    TextToImageFinetuneModule,
    TextToImageVDUModule,
)
from vdu_lightning.modules.unlearning import UnlearningModule
from vdu_lightning.modules.vdu import VDUModule

__all__ = ["ClassifierModule", "DiffusionModule", "EWCModule", "GradientAscentModule",
           "IsotropicAnchorModule", "RetainFinetuneModule", "SFDModule", "SalUnModule",
           "TextToImageFinetuneModule", "TextToImageVDUModule", "UnlearningModule", "VDUModule"]
