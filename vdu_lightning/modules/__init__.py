"""LightningModules: DDPM pre-training, the evaluation classifier, VDU unlearning."""

from vdu_lightning.modules.classifier import ClassifierModule
from vdu_lightning.modules.diffusion import DiffusionModule
from vdu_lightning.modules.vdu import VDUModule

__all__ = ["ClassifierModule", "DiffusionModule", "VDUModule"]
