"""Data sets (embedded, on disk, image folders) and the datamodules built on them."""

from vdu_lightning._lazy import lazy_namespace

_NAMES = {
    "DATASETS": "vdu_lightning.data.registry",
    "CaptionedImageFolder": "vdu_lightning.data.folder",
    "ForgetSetDataModule": "vdu_lightning.data.datamodules",
    "ImageDataModule": "vdu_lightning.data.datamodules",
    "LabeledImages": "vdu_lightning.data.datasets",
    "ResumableShuffle": "vdu_lightning.data.sampling",
    "VDUDataModule": "vdu_lightning.data.datamodules",
    "dataset_info": "vdu_lightning.data.registry",
    "load_dataset": "vdu_lightning.data.registry",
    "stratified_split": "vdu_lightning.data.datasets",
}
__getattr__, __dir__ = lazy_namespace(__name__, _NAMES)
__all__ = sorted(_NAMES)
