"""ImageDataModule and ForgetSetDataModule: contents, caps, errors, and sharding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.utilities import CombinedLoader
from PIL import Image

from vdu_lightning import ForgetSetDataModule, ImageDataModule
from vdu_lightning.data import ResumableShuffle


def test_image_datamodule_batches() -> None:
    dm = ImageDataModule(dataset="mnist5k", image_size=16, batch_size=64)
    assert (dm.channels, dm.resolved_image_size, dm.num_classes) == (1, 16, 10)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (64, 1, 16, 16) and batch["label"].shape == (64,)
    assert len(dm.train_set) == 4500 and len(dm.val_set) == 500
    dm.setup("test")
    assert len(dm.test_set) == 500


def test_forget_set_holds_only_forget_classes_capped_and_reproducible() -> None:
    dm = ForgetSetDataModule(dataset="mnist5k", forget_classes=[0, 7], forget_size=100,
                             eval_size=30, batch_size=16)
    dm.setup("fit")
    assert len(dm.forget_set) == 100
    assert set(dm.forget_set.labels.tolist()) <= {0, 7}
    assert dm.retain_set is None
    assert dm.retain_classes == [1, 2, 3, 4, 5, 6, 8, 9]
    forget_eval, retain_eval = dm.val_dataloader()
    assert set(forget_eval.dataset.labels.tolist()) == {0, 7}
    assert set(retain_eval.dataset.labels.tolist()) == set(dm.retain_classes)
    assert len(forget_eval.dataset) == len(retain_eval.dataset) == 30
    again = ForgetSetDataModule(dataset="mnist5k", forget_classes=[7, 0], forget_size=100)
    again.setup("fit")
    assert torch.equal(again.forget_set.images, dm.forget_set.images)
    other = ForgetSetDataModule(dataset="mnist5k", forget_classes=[0, 7], forget_size=100,
                                subset_seed=1)
    other.setup("fit")
    assert not torch.equal(other.forget_set.images, dm.forget_set.images)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (16, 1, 16, 16)


def test_forget_size_larger_than_the_class_takes_the_whole_class() -> None:
    dm = ForgetSetDataModule(dataset="mnist5k", forget_classes=[3], forget_size=10_000)
    dm.setup("fit")
    assert len(dm.forget_set) == 450  # 500 per class, 10% held out for evaluation


def test_evaluation_items_are_held_out_from_the_forget_set() -> None:
    dm = ForgetSetDataModule(dataset="digits", forget_classes=[5], forget_size=1000)
    dm.setup("fit")
    train_rows = {tuple(x.flatten().tolist()) for x in dm.forget_set.images}
    held_out = [tuple(x.flatten().tolist()) for x in dm.forget_eval_set.images]
    assert sum(row in train_rows for row in held_out) == 0


def test_retain_set_gives_combined_batches() -> None:
    dm = ForgetSetDataModule(dataset="digits", forget_classes=[1], forget_size=20,
                             retain_classes=[2, 3], retain_size=50, batch_size=8)
    dm.setup("fit")
    assert len(dm.retain_set) == 50 and set(dm.retain_set.labels.tolist()) <= {2, 3}
    loader = dm.train_dataloader()
    assert isinstance(loader, CombinedLoader)
    batch, _, _ = next(iter(loader))
    assert set(batch) == {"forget", "retain"}
    assert set(batch["forget"]["label"].tolist()) == {1}
    assert set(batch["retain"]["label"].tolist()) <= {2, 3}


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"forget_classes": [10]}, r"classes \[10\] are not in dataset 'mnist5k'"),
        ({"forget_classes": [1], "retain_classes": [1, 2]}, r"overlap on \[1\]"),
        ({"forget_classes": []}, "forget_classes is empty"),
        ({}, "exactly one forget source"),
        ({"forget_classes": [1], "forget_folder": "x"}, "exactly one forget source"),
        ({"forget_classes": [1], "forget_size": 0}, "forget_size must be an int >= 1"),
        ({"forget_classes": [1], "retain_size": -1}, "retain_size must be an int >= 0"),
        ({"forget_classes": [1], "dataset": "cifar10"}, "set `root`"),
        ({"forget_classes": [1], "batch_size": 0}, "batch_size must be a positive int"),
        ({"forget_classes": [1], "image_size": -4}, "image_size must be a positive int"),
        ({"forget_classes": list(range(10))},
         r"^forget_classes=\[0, 1, 2, 3, 4, 5, 6, 7, 8, 9\] names every class of dataset "
         r"'mnist5k': no class is left to retain \(the retain evaluation needs one\)"),
        ({"forget_classes": [1], "retain_classes": []}, "^retain_classes is empty"),
    ],
)
def test_bad_arguments_are_refused_before_any_data_are_read(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        ForgetSetDataModule(**kwargs)


def test_empty_forget_set_is_refused_at_setup(tmp_path: Path) -> None:
    import json

    for i in range(6):
        Image.fromarray(np.full((4, 4, 3), i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
    rows = [{"file_name": f"{i}.png", "label": i % 2} for i in range(6)]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    dm = ForgetSetDataModule(dataset="folder", root=str(tmp_path), forget_classes=[5],
                             val_fraction=0.3)
    with pytest.raises(ValueError, match="the forget set is empty"):
        dm.setup("fit")


def test_forgetting_every_class_of_a_folder_is_refused_once_its_labels_are_read(
        tmp_path: Path) -> None:
    for i in range(6):
        Image.fromarray(np.full((4, 4, 3), i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
    rows = [{"file_name": f"{i}.png", "label": i % 2} for i in range(6)]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    dm = ForgetSetDataModule(dataset="folder", root=str(tmp_path), forget_classes=[0, 1],
                             val_fraction=0.3)
    with pytest.raises(ValueError, match=r"^forget_classes=\[0, 1\] names every class of "
                                         r"dataset 'folder': no class is left to retain"):
        dm.setup("fit")


def test_forget_folder_is_the_forget_set(tmp_path: Path) -> None:
    for i in range(5):
        Image.fromarray(np.full((6, 6, 3), 40 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"style {i}")
    dm = ForgetSetDataModule(dataset="digits", forget_folder=str(tmp_path), forget_size=3,
                             image_size=8, batch_size=2)
    dm.setup("fit")
    assert len(dm.forget_set) == 3
    batch = next(iter(dm.train_dataloader()))
    # Converted to the data set's channels (digits are grey), so batches fit the model.
    assert batch["image"].shape == (2, 1, 8, 8) and len(batch["caption"]) == 2
    assert dm.forget_eval_set is dm.forget_set


class DictItems(torch.utils.data.Dataset):
    """A user's own data set: no ``subset`` method, items are dicts."""

    def __init__(self, n: int) -> None:
        self.images = torch.linspace(-1, 1, n).reshape(n, 1, 1, 1).expand(n, 1, 8, 8)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "label": 3}


def test_forget_dataset_given_by_the_user_is_capped(tmp_path: Path) -> None:
    import lightning.pytorch as pl

    dm = ForgetSetDataModule(dataset="digits", forget_dataset=DictItems(12), forget_size=5,
                             batch_size=5)
    assert "forget_dataset" not in dm.hparams  # never pickled into a checkpoint
    dm.setup("fit")
    assert len(dm.forget_set) == 5
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (5, 1, 8, 8) and set(batch["label"].tolist()) == {3}
    with pytest.raises(ValueError, match="forget_dataset is empty"):
        ForgetSetDataModule(dataset="digits", forget_dataset=DictItems(0))
    # A checkpoint of a real run on this datamodule loads with weights_only=True.
    from conftest import TINY_UNET

    from vdu_lightning import DiffusionModule
    from vdu_lightning.files import load_checkpoint

    trainer = pl.Trainer(max_steps=1, limit_val_batches=0, logger=False, accelerator="cpu",
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(DiffusionModule(unet=dict(TINY_UNET)), datamodule=dm)
    trainer.save_checkpoint(tmp_path / "x.ckpt")
    assert load_checkpoint(tmp_path / "x.ckpt")["datamodule_hyper_parameters"]["forget_size"] == 5


def write_labelled_folder(root: Path, labels: list[int]) -> None:
    import json

    for i, label in enumerate(labels):
        Image.fromarray(np.full((4, 4, 3), 10 * i, dtype=np.uint8)).save(root / f"{i}.png")
    rows = [{"file_name": f"{i}.png", "label": label} for i, label in enumerate(labels)]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))


def test_folder_retain_classes_are_read_from_the_labels(tmp_path: Path) -> None:
    write_labelled_folder(tmp_path, [0, 1, 2] * 6)
    dm = ForgetSetDataModule(dataset="folder", root=str(tmp_path), forget_classes=[1],
                             retain_size=4, val_fraction=0.3)
    dm.setup("fit")
    assert dm.retain_classes == [0, 2]
    assert set(dm.retain_set.labels.tolist()) <= {0, 2} and len(dm.retain_set) == 4
    forget_eval, retain_eval = dm.val_dataloader()
    assert set(forget_eval.dataset.labels.tolist()) == {1}
    assert set(retain_eval.dataset.labels.tolist()) == {0, 2}


def test_an_empty_evaluation_split_is_refused_not_dropped(tmp_path: Path) -> None:
    # Class 1 has a single item: it stays in training, so its held-out part is empty.
    write_labelled_folder(tmp_path, [0] * 6 + [1])
    dm = ForgetSetDataModule(dataset="folder", root=str(tmp_path), forget_classes=[1],
                             val_fraction=0.3)
    with pytest.raises(ValueError, match="the forget evaluation split is empty"):
        dm.setup("fit")


@pytest.mark.parametrize("limit, batches_done, skipped", [
    (1.0, 2, 2),   # part-way through a whole epoch of 4 batches: skip the 2 done
    (1.0, 4, 0),   # the epoch had ended: a new one starts from its first batch
    (2, 2, 0),     # limit_train_batches=2 ends the epoch after 2 batches
    (0.5, 1, 1),   # half an epoch is 2 batches: 1 done
])
def test_a_resumed_epoch_skips_the_batches_already_trained_on(
        limit: int | float, batches_done: int, skipped: int) -> None:
    sampler = ResumableShuffle(range(12), seed=0)  # 4 batches of 3
    sampler.set_epoch(1)
    order = list(sampler)
    sampler.resume_at(batches_done, batch_size=3, limit=limit)
    assert list(sampler) == order[3 * skipped:]
    assert list(sampler) == order  # only the first iteration after a resume skips
