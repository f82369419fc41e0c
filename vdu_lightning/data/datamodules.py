"""LightningDataModules: full data for pre-training, the forget set for unlearning.

Training loaders shuffle with ``ResumableShuffle``: an order fixed by the job's seed and the
epoch, sharded across DDP ranks, that a run resumed part-way through an epoch continues where
the interrupted run stopped. Evaluation loaders are sharded by Lightning under DDP.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset, Subset
from typing_extensions import override

from vdu_lightning.data.datasets import check_image_size
from vdu_lightning.data.folder import CaptionedImageFolder
from vdu_lightning.data.hf import HFColumns, check_filter_columns, read_images, read_split
from vdu_lightning.data.registry import DATASETS, dataset_info, load_dataset
from vdu_lightning.data.sampling import ResumableShuffle
from vdu_lightning.seeding import base_seed


class VDUDataModule(pl.LightningDataModule):
    """Base of the project's datamodules: which data set, at which size, in which batches.

    Args:
        dataset: ``mnist5k``, ``digits``, ``mnist``, ``fashion_mnist``, ``cifar10``,
            ``folder``, or a Hugging Face dataset (below).
        root: the folder with the files (all but the embedded sets).
        image_size: side of the images; None gives the data set's default.
        batch_size: items per batch on each process.
        num_workers: DataLoader worker processes.
        val_fraction: fraction of each class held out for validation.
        split_seed: seed of the train/validation split.
        image_column, label_column, caption_column, revision: for a Hugging Face dataset
            (``dataset`` a Hub ID such as ``uoft-cs/cifar10``, or a local folder that
            ``datasets`` reads; see ``vdu_lightning.data.hf``): the columns of the images,
            the integer labels (None: unlabelled) and the captions, and the Hub revision.
    """

    def __init__(
        self,
        dataset: str = "mnist5k",
        root: str | None = None,
        image_size: int | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        image_column: str = "image",
        label_column: str | None = "label",
        caption_column: str | None = None,
        revision: str | None = None,
    ) -> None:
        super().__init__()
        if image_size is not None:
            check_image_size(image_size)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
        self.columns = HFColumns(image_column, label_column, caption_column, revision)
        # A Hugging Face dataset is opened here: its classes are checked against the config.
        self.info = dataset_info(dataset, self.columns)
        if self.info.needs_root and root is None:
            raise ValueError(f"dataset {dataset!r} is read from disk: set `root` to its folder")
        # Subclass arguments are collected too. A Dataset object is never an hparam: it
        # would be pickled into checkpoints, which then no longer load with weights_only.
        self.save_hyperparameters(ignore=["forget_dataset"])

    @property
    def channels(self) -> int:
        """Channels of every image (1 grey, 3 RGB)."""
        return self.info.channels

    @property
    def resolved_image_size(self) -> int | None:
        """The image side the batches will have (None for a folder with no size given)."""
        return self.hparams.image_size or self.info.image_size or None

    @property
    def num_classes(self) -> int:
        """Number of labelled classes (0 when the labels are only known after reading)."""
        return len(self.info.classes)

    def load(self, split: str) -> Dataset:
        """A part of the configured data set (``train``, ``val`` or ``test``)."""
        hp = self.hparams
        return load_dataset(
            hp.dataset, hp.root, hp.image_size, split, hp.val_fraction, hp.split_seed,
            self.columns, exclude=hp.get("forget_where"),  # forget rows are never retained
        )

    def loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        """Batches of ``dataset``: for training (``shuffle``) this process's share in the
        resumable order, else in order (Lightning shards those under DDP)."""
        sampler = self._training_sampler(dataset) if shuffle else None
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            sampler=sampler,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
        )

    def _training_sampler(self, dataset: Dataset) -> ResumableShuffle:
        trainer = self.trainer
        if trainer is None:  # a loader asked for outside a Trainer
            return ResumableShuffle(dataset, seed=base_seed())
        sampler = ResumableShuffle(dataset, trainer.world_size, trainer.global_rank,
                                   base_seed())
        # Lightning has restored its loops before it asks for loaders: on a resume, this
        # counts the batches of the interrupted epoch that were already trained on.
        sampler.resume_at(trainer.fit_loop.epoch_loop.batch_progress.current.processed,
                          self.hparams.batch_size, trainer.limit_train_batches)
        return sampler


class ImageDataModule(VDUDataModule):
    """The whole data set: pre-training a DDPM and training the evaluation classifier.

    Example:
        >>> dm = ImageDataModule(dataset="digits", batch_size=32)
        >>> dm.setup("fit")
        >>> next(iter(dm.train_dataloader()))["image"].shape
        torch.Size([32, 1, 8, 8])
    """

    @override
    def setup(self, stage: str) -> None:
        if stage == "fit" and not hasattr(self, "train_set"):
            self.train_set = self.load("train")
        if stage in ("fit", "validate") and not hasattr(self, "val_set"):
            self.val_set = self.load("val")
        if stage == "test" and not hasattr(self, "test_set"):
            self.test_set = self.load("test")

    @override
    def train_dataloader(self) -> DataLoader:
        return self.loader(self.train_set, shuffle=True)

    @override
    def val_dataloader(self) -> DataLoader:
        return self.loader(self.val_set, shuffle=False)

    @override
    def test_dataloader(self) -> DataLoader:
        return self.loader(self.test_set, shuffle=False)


def _random_cap(dataset: Any, mask: torch.Tensor, cap: int, generator: torch.Generator):
    """At most ``cap`` items of ``dataset`` where ``mask`` holds, drawn with ``generator``."""
    members = torch.nonzero(mask).flatten()
    chosen = torch.sort(members[torch.randperm(len(members), generator=generator)[:cap]]).values
    if hasattr(dataset, "subset"):
        return dataset.subset(chosen)
    return Subset(dataset, chosen.tolist())


class ForgetSetDataModule(VDUDataModule):
    """The forget set D_f (and optionally a retain set D_r) of one unlearning job.

    D_f is the training items of ``forget_classes`` (or every item of ``forget_folder`` or of
    ``forget_dataset``), capped at ``forget_size`` items drawn with ``subset_seed``: unlearning
    sees only this small set. D_r, used only by the baselines that need one, is capped at
    ``retain_size`` (0: none). Validation and test use held-out items:
    ``[forget_eval, retain_eval]``, each capped at ``eval_size``.

    Training batches are the forget batch alone, or ``{"forget": ..., "retain": ...}`` when
    a retain set is asked for (the shorter set cycles).

    Args:
        forget_classes: labels to forget (e.g. ``[0]``).
        forget_folder: instead of classes, a folder of images (see ``CaptionedImageFolder``),
            converted to the data set's channels.
        forget_dataset: instead of classes, any map-style data set whose items are
            ``{"image": [C, H, W] in [-1, 1], "label": int}`` dicts (Python API).
        forget_where: instead of classes, for a Hugging Face dataset: the rows of its
            ``train`` split whose columns hold these values (a list: any of them), e.g.
            ``{"artist": "Claude Monet"}``; captioned with ``caption_column``.
        forget_size: the most forget items used (the data-constrained setting).
        retain_classes: labels of D_r and of the retain evaluation; None: every other class.
        retain_size: the most retain items used for training; 0 trains on D_f alone.
        eval_size: the most items of each evaluation part.
        subset_seed: seed drawing the capped subsets.
        **kwargs: the ``VDUDataModule`` arguments (dataset, root, image_size, batch_size, ...).

    Raises:
        ValueError: before any data are read, on a class not in the data set, forget and
            retain classes overlapping, not exactly one forget source, or a bad size; on
            ``setup``, on an empty forget set.

    Example:
        >>> dm = ForgetSetDataModule(dataset="digits", forget_classes=[3], forget_size=50)
        >>> dm.setup("fit")
        >>> len(dm.forget_set), set(dm.forget_set.labels.tolist())
        (50, {3})
    """

    def __init__(
        self,
        forget_classes: Sequence[int] | None = None,
        forget_folder: str | None = None,
        forget_dataset: Dataset | None = None,
        forget_size: int = 500,
        retain_classes: Sequence[int] | None = None,
        retain_size: int = 0,
        eval_size: int = 500,
        subset_seed: int = 0,
        dataset: str = "mnist5k",
        root: str | None = None,
        image_size: int | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        image_column: str = "image",
        label_column: str | None = "label",
        caption_column: str | None = None,
        revision: str | None = None,
        forget_where: dict[str, Any] | None = None,
    ) -> None:
        sources = [forget_classes, forget_folder, forget_dataset, forget_where]
        if sum(source is not None for source in sources) != 1:
            raise ValueError(
                "give exactly one forget source: forget_classes (labels), forget_folder (a "
                "folder of images), forget_dataset (a Dataset) or forget_where (a filter of a "
                "Hugging Face dataset's rows)"
            )
        if forget_where is not None and (dataset in DATASETS or not forget_where):
            raise ValueError("forget_where filters the rows of a Hugging Face dataset (a Hub "
                             "ID or a local folder) by column values, e.g. {'artist': 'X'}: "
                             f"give such a dataset and at least one column, not {dataset!r} "
                             f"and {forget_where!r}")
        super().__init__(dataset, root, image_size, batch_size, num_workers, val_fraction,
                         split_seed, image_column, label_column, caption_column, revision)
        if forget_where is not None:  # the dataset is open: a wrong column is named now
            check_filter_columns(dataset, read_split(dataset, "train", self.columns),
                                 forget_where)
        if forget_dataset is not None and len(forget_dataset) == 0:
            raise ValueError("forget_dataset is empty: the forget set needs at least one item")
        for name, value, least in (
            ("forget_size", forget_size, 1), ("retain_size", retain_size, 0),
            ("eval_size", eval_size, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
        known = self.info.classes
        forget = sorted(set(forget_classes or ()))
        if forget_classes is not None and not forget:
            raise ValueError("forget_classes is empty: name at least one class to forget")
        if retain_classes is None:
            # Classes of a folder data set are only known once read: `setup` fills them in.
            retain = [c for c in known if c not in forget] if known else None
        else:
            retain = sorted(set(retain_classes))
            if not retain:
                raise ValueError("retain_classes is empty: name at least one class to retain, "
                                 "or leave it unset (every class not forgotten)")
        unknown = [c for c in forget + (retain or []) if known and c not in known]
        if unknown:
            raise ValueError(
                f"classes {unknown} are not in dataset {dataset!r}, whose classes are "
                f"{list(known)}"
            )
        overlap = sorted(set(forget) & set(retain or []))
        if overlap:
            raise ValueError(f"forget and retain classes overlap on {overlap}: they must differ")
        self.forget_classes, self.retain_classes = forget, retain
        self._check_a_class_is_retained()
        self.forget_dataset = forget_dataset

    def _check_a_class_is_retained(self) -> None:
        # Else the retain evaluation would be empty, and only found so after the data are read.
        if self.retain_classes == []:
            raise ValueError(
                f"forget_classes={self.forget_classes} names every class of dataset "
                f"{self.hparams.dataset!r}: no class is left to retain (the retain evaluation "
                "needs one); forget fewer classes"
            )

    def _forget_pool(self) -> Any:
        """The user-given forget data (folder, data set or filtered rows), or None for forget
        classes."""
        if self.hparams.forget_where is not None:
            return read_images(self.hparams.dataset, "train", self.columns,
                               self.resolved_image_size, self.channels,
                               where=self.hparams.forget_where)
        if self.hparams.forget_folder is not None:
            return CaptionedImageFolder(
                self.hparams.forget_folder, self.resolved_image_size, self.channels
            )
        return self.forget_dataset

    @override
    def setup(self, stage: str) -> None:
        if hasattr(self, "forget_set"):
            return
        hp = self.hparams
        generator = torch.Generator().manual_seed(hp.subset_seed)
        given = self._forget_pool()
        if given is not None:
            self.forget_set = _random_cap(
                given, torch.ones(len(given), dtype=torch.bool), hp.forget_size, generator
            )
            if isinstance(self.forget_set, CaptionedImageFolder):
                # Its images are decoded in training: a file that cannot be opened is named
                # now, before the data are read and the prior is built.
                self.forget_set.check_images()
        train = self.load("train")
        if self.retain_classes is None:
            self.retain_classes = [c for c in train.classes if c not in self.forget_classes]
            self._check_a_class_is_retained()
        if given is None:
            forget_mask = torch.isin(train.labels, torch.tensor(self.forget_classes))
            self.forget_set = _random_cap(train, forget_mask, hp.forget_size, generator)
        if len(self.forget_set) == 0:
            raise ValueError(
                f"the forget set is empty: no training item of dataset {hp.dataset!r} has a "
                f"label in forget_classes={self.forget_classes}" if given is None else
                "the forget set is empty: the given forget data hold no item"
                + (f" (no 'train' row matches forget_where={hp.forget_where})"
                   if hp.forget_where is not None else "")
            )
        retain_of = torch.tensor(self.retain_classes, dtype=torch.int64)
        self.retain_set = (
            _random_cap(train, torch.isin(train.labels, retain_of), hp.retain_size, generator)
            if hp.retain_size > 0 else None
        )
        if self.retain_set is not None and len(self.retain_set) == 0:
            raise ValueError(f"retain_size={hp.retain_size} but no training item of dataset "
                             f"{hp.dataset!r} has a label in {self.retain_classes}")
        held_out = self.load("val")
        # A user-given forget set has no held-out part: its evaluation is the forget set itself.
        self.forget_eval_set = (
            self.forget_set if given is not None else _random_cap(
                held_out, torch.isin(held_out.labels, torch.tensor(self.forget_classes)),
                hp.eval_size, generator,
            )
        )
        self.retain_eval_set = _random_cap(
            held_out, torch.isin(held_out.labels, retain_of), hp.eval_size, generator
        )
        # Empty parts are refused rather than dropped: loader 0 must always be the forget part.
        for name, part in (("forget", self.forget_eval_set), ("retain", self.retain_eval_set)):
            if len(part) == 0:
                raise ValueError(
                    f"the {name} evaluation split is empty: the held-out part of dataset "
                    f"{hp.dataset!r} (val_fraction={hp.val_fraction}) has no item of its classes"
                )

    @override
    def train_dataloader(self) -> DataLoader | CombinedLoader:
        forget = self.loader(self.forget_set, shuffle=True)
        if self.retain_set is None:
            return forget
        retain = self.loader(self.retain_set, shuffle=True)
        return CombinedLoader({"forget": forget, "retain": retain}, mode="max_size_cycle")

    @override
    def val_dataloader(self) -> list[DataLoader]:
        """``[forget_eval, retain_eval]``, in that order."""
        return [self.loader(part, shuffle=False)
                for part in (self.forget_eval_set, self.retain_eval_set)]

    @override
    def test_dataloader(self) -> list[DataLoader]:
        return self.val_dataloader()
