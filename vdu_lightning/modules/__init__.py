"""LightningModules: DDPM pre-training and the evaluation classifier."""

from vdu_lightning.modules.classifier import ClassifierModule
from vdu_lightning.modules.diffusion import DiffusionModule

__all__ = ["ClassifierModule", "DiffusionModule"]
