"""vdu_lightning: machine unlearning for diffusion models, as PyTorch Lightning parts."""

__version__ = "0.1.0"

from vdu_lightning.data import ForgetSetDataModule, ImageDataModule  # noqa: E402
from vdu_lightning.modules import ClassifierModule, DiffusionModule  # noqa: E402

__all__ = [
    "ClassifierModule",
    "DiffusionModule",
    "ForgetSetDataModule",
    "ImageDataModule",
    "__version__",
]
