"""Data sets (embedded, on disk, image folders) and the datamodules built on them."""

from vdu_lightning.data.datamodules import ForgetSetDataModule, ImageDataModule, VDUDataModule
from vdu_lightning.data.datasets import LabeledImages, stratified_split
from vdu_lightning.data.folder import CaptionedImageFolder
from vdu_lightning.data.registry import DATASETS, dataset_info, load_dataset
from vdu_lightning.data.sampling import ResumableShuffle

__all__ = [
    "DATASETS",
    "CaptionedImageFolder",
    "ForgetSetDataModule",
    "ImageDataModule",
    "LabeledImages",
    "ResumableShuffle",
    "VDUDataModule",
    "dataset_info",
    "load_dataset",
    "stratified_split",
]
