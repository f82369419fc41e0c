"""Callbacks: sample grids and model export."""

from vdu_lightning.callbacks.export import ExportPretrained
from vdu_lightning.callbacks.samples import SampleGridLogger

__all__ = ["ExportPretrained", "SampleGridLogger"]
