"""vdu_lightning: machine unlearning for diffusion models, as PyTorch Lightning parts."""

__version__ = "0.1.0"

from vdu_lightning.data import ForgetSetDataModule, ImageDataModule  # noqa: E402
from vdu_lightning.modules import (  # noqa: E402
    ClassifierModule,
    DiffusionModule,
    EWCModule,
    GradientAscentModule,
    IsotropicAnchorModule,
    RetainFinetuneModule,
    SalUnModule,
    SFDModule,
    TextToImageFinetuneModule,
    TextToImageVDUModule,
    UnlearningModule,
    VDUModule,
)
from vdu_lightning.prior import ParameterPrior  # noqa: E402

__all__ = [
    "ClassifierModule",
    "DiffusionModule",
    "EWCModule",
    "ForgetSetDataModule",
    "GradientAscentModule",
    "ImageDataModule",
    "IsotropicAnchorModule",
    "ParameterPrior",
    "RetainFinetuneModule",
    "SalUnModule",
    "SFDModule",
    "TextToImageFinetuneModule",
    "TextToImageVDUModule",
    "UnlearningModule",
    "VDUModule",
    "__version__",
]
