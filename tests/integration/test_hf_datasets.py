"""Hugging Face datasets as data: by Hub ID from a cache built in the test, or a local folder."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from hub_cache import add_to_hub_cache, save_parquet_dataset
from vdu_lightning import ForgetSetDataModule, ImageDataModule
from vdu_lightning.data.hf import HFImages
from vdu_lightning.hub import HubModelNotFound

SIZES = {"train": 80, "test": 20}


@pytest.fixture
def tiny_cifar(tmp_path: Path, hub_cache: Path) -> str:
    add_to_hub_cache(hub_cache, "someone/tiny-cifar",
                     save_parquet_dataset(tmp_path / "tiny-cifar", SIZES), repo_type="dataset")
    return "someone/tiny-cifar"


def test_a_hub_dataset_is_read_with_its_splits_classes_and_pixels(tiny_cifar: str,
                                                                  tmp_path: Path) -> None:
    data = ImageDataModule(dataset=tiny_cifar, image_column="img", batch_size=8,
                           val_fraction=0.25)
    assert (data.channels, data.resolved_image_size, data.num_classes) == (3, 8, 4)
    train, val, test = (data.load(split) for split in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (60, 20, 20)  # test: the dataset's own split
    assert train.classes == val.classes == [0, 1, 2, 3]

    # The pixels are the parquet file's, scaled to [-1, 1] (the first test row).
    raw = datasets.load_dataset(str(tmp_path / "tiny-cifar"), split="test")
    expected = torch.from_numpy(np.asarray(raw[0]["img"])).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(test[0]["image"], expected)
    assert test[0]["label"] == raw[0]["label"] == 0

    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["image"].shape == (8, 3, 8, 8)


def test_forgetting_a_class_of_a_hub_dataset(tiny_cifar: str) -> None:
    data = ForgetSetDataModule(dataset=tiny_cifar, image_column="img", forget_classes=[1],
                               forget_size=10, eval_size=5, image_size=16)
    data.setup("fit")
    assert data.retain_classes == [0, 2, 3]
    assert len(data.forget_set) == 10 and set(data.forget_set.labels.tolist()) == {1}
    assert set(data.retain_eval_set.labels.tolist()) <= {0, 2, 3}
    assert data.forget_set[0]["image"].shape == (3, 16, 16)  # resized as configured


def test_a_forget_set_by_filter_carries_its_captions(tmp_path: Path) -> None:
    folder = str(save_parquet_dataset(tmp_path / "local", SIZES))  # a local folder, no Hub
    data = ForgetSetDataModule(dataset=folder, image_column="img", caption_column="text",
                               forget_where={"text": ["a photo of 2", "a photo of 3"]},
                               forget_size=100, eval_size=5)
    data.setup("fit")
    captions = [data.forget_set[i]["caption"] for i in range(len(data.forget_set))]
    assert len(captions) == 40 and set(captions) == {"a photo of 2", "a photo of 3"}
    assert set(data.forget_set.labels.tolist()) == {2, 3}

    # The forget rows are never retained: not in the retain set, not in the retain evaluation.
    both = ForgetSetDataModule(dataset=folder, image_column="img", caption_column="text",
                               forget_where={"label": 2}, retain_size=100, eval_size=30)
    both.setup("fit")
    assert len(both.forget_set) == 20 and set(both.forget_set.labels.tolist()) == {2}
    for part in (both.retain_set, both.retain_eval_set):
        assert len(part) > 0 and 2 not in part.labels.tolist()
        assert all(part[i]["caption"] != "a photo of 2" for i in range(len(part)))
    assert isinstance(both.retain_set, HFImages)  # decoded when read, not held as pixels

    nothing = ForgetSetDataModule(dataset=folder, image_column="img",
                                  forget_where={"text": "a painting"}, eval_size=5)
    with pytest.raises(ValueError, match=r"the forget set is empty.*no 'train' row matches "
                                         r"forget_where=\{'text': 'a painting'\}"):
        nothing.setup("fit")


def test_bad_dataset_input_is_named(tiny_cifar: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"has no column \['image'\] \(its columns: "
                                         r"\['img', 'text', 'label'\]\)"):
        ImageDataModule(dataset=tiny_cifar)  # the default image column is "image"
    with pytest.raises(HubModelNotFound, match=r"dataset someone/absent is not a local path, "
                                               r"and not in the Hugging Face cache"):
        ImageDataModule(dataset="someone/absent")
    with pytest.raises(ValueError, match="forget_where filters the rows of a Hugging Face"):
        ForgetSetDataModule(dataset="digits", forget_where={"label": 3})
    with pytest.raises(ValueError, match=r"forget_where names columns \['artist'\] that "
                                         r"dataset 'someone/tiny-cifar' does not have"):
        ForgetSetDataModule(dataset=tiny_cifar, image_column="img", forget_where={"artist": 1})
    with pytest.raises(ValueError, match=r"image_column 'text' of dataset .* holds str, not "
                                         r"images"):
        ImageDataModule(dataset=tiny_cifar, image_column="text")
    with pytest.raises(ValueError, match=r"label_column 'text' must hold integer labels"):
        ImageDataModule(dataset=tiny_cifar, image_column="img", label_column="text")
    with pytest.raises(ValueError, match=r"classes \[7\] are not in dataset"):
        ForgetSetDataModule(dataset=tiny_cifar, image_column="img", forget_classes=[7])
