"""``ClassifierNet``: the evaluation classifier as a plain torch network, and its directory.

The evaluation counts generated samples by class (PUL, UA) and takes its FID features from
the same network, so a generator that changes what the classifier sees without changing
what it draws must not score. Two defences are built in:

* every image is standardised to zero mean and unit deviation before the first layer, so
  the network is invariant to a global intensity offset and to a contrast change by
  construction (a faint haze or a dimmer sample reads as the same digit);
* ``ClassifierModule`` trains it with photometric augmentation (``evaluation.photometric``),
  so it is robust to mild noise and blur too.

Two architectures, so that two evaluators can differ in more than their seed: ``vgg``
(3×3 convolutions with batch norm, global pooling) and ``lenet`` (5×5 convolutions, group
norm, a fully connected penultimate layer).

The directory format is ``config.json`` (the constructor's arguments) and
``model.safetensors``: nothing is unpickled, and a file that does not fit is refused by name.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from typing_extensions import override

from vdu_lightning.files import atomic_directory

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
ARCHITECTURES = ("vgg", "lenet")
#: The smallest deviation an image is divided by: a blank image must not be blown up into
#: full-contrast noise (real digits in [-1, 1] have a deviation near 0.7).
MIN_STD = 0.05


def standardise(images: Tensor) -> Tensor:
    """Each image minus its mean, divided by its deviation (at least ``MIN_STD``).

    Example:
        >>> x = torch.rand(2, 1, 8, 8)
        >>> torch.allclose(standardise(x), standardise(0.5 * x + 0.3), atol=1e-5)
        True
    """
    flat = images.flatten(1)
    mean = flat.mean(1).view(-1, *[1] * (images.dim() - 1))
    std = flat.std(1).clamp_min(MIN_STD).view_as(mean)
    return (images - mean) / std


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def _vgg_body(in_channels: int, width: int) -> tuple[nn.Sequential, int]:
    body = nn.Sequential(
        _conv_block(in_channels, width),
        _conv_block(width, width),
        nn.MaxPool2d(2),
        _conv_block(width, 2 * width),
        _conv_block(2 * width, 2 * width),
        nn.MaxPool2d(2),
        _conv_block(2 * width, 4 * width),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    return body, 4 * width


def _lenet_body(in_channels: int, width: int) -> tuple[nn.Sequential, int]:
    # Pooling to a fixed 4×4 grid keeps the fully connected layer independent of image size.
    body = nn.Sequential(
        nn.Conv2d(in_channels, width, 5, padding=2),
        nn.GroupNorm(4, width),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 5, padding=2),
        nn.GroupNorm(4, 2 * width),
        nn.ReLU(inplace=True),
        nn.AdaptiveMaxPool2d(4),
        nn.Flatten(),
        nn.Linear(2 * width * 16, 4 * width),
        nn.ReLU(inplace=True),
    )
    return body, 4 * width


class ClassifierNet(nn.Module):
    """An image classifier whose penultimate layer gives FID features; torch only.

    Args:
        in_channels: image channels.
        num_classes: number of classes.
        width: channels of the first stage (the features have ``4 * width`` dimensions).
        dropout: dropout before the linear head.
        architecture: ``vgg`` or ``lenet``.
        normalise: standardise each image first (offset- and contrast-invariant). Only for
            ablations: an evaluation classifier without it reads a faint haze as a class.

    Example:
        >>> net = ClassifierNet(in_channels=1, num_classes=10, width=8)
        >>> net.features(torch.zeros(2, 1, 16, 16)).shape
        torch.Size([2, 32])
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32,
                 dropout: float = 0.25, architecture: str = "vgg", normalise: bool = True
                 ) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        if isinstance(width, bool) or not isinstance(width, int) or width < 4 or width % 4:
            raise ValueError(f"width must be a positive multiple of 4, got {width!r}")
        if architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {list(ARCHITECTURES)}, got "
                             f"{architecture!r}")
        self.config = {"in_channels": in_channels, "num_classes": num_classes, "width": width,
                       "dropout": dropout, "architecture": architecture,
                       "normalise": normalise}
        build = _vgg_body if architecture == "vgg" else _lenet_body
        self.body, self.feature_dim = build(in_channels, width)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.feature_dim, num_classes))

    @property
    def in_channels(self) -> int:
        return self.config["in_channels"]

    @property
    def num_classes(self) -> int:
        return self.config["num_classes"]

    def features(self, images: Tensor) -> Tensor:
        """Penultimate-layer features ``[B, feature_dim]`` of images in [-1, 1]."""
        if images.dim() != 4 or images.shape[1] != self.in_channels:
            raise ValueError(f"the classifier takes [N, {self.in_channels}, H, W] images, got "
                             f"shape {tuple(images.shape)}")
        return self.body(standardise(images) if self.config["normalise"] else images)

    @override
    def forward(self, images: Tensor) -> Tensor:
        """Logits ``[B, num_classes]``."""
        return self.head(self.features(images))

    @torch.no_grad()
    def predict(self, images: Tensor, batch_size: int = 500) -> tuple[Tensor, Tensor]:
        """(labels ``[N]``, confidences ``[N]``) in eval mode, whatever the network's mode.

        Images are read in batches on the network's device; the results are on the CPU.
        """
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        try:
            probabilities = torch.cat([
                self(chunk.to(device).float()).softmax(1).cpu()
                for chunk in images.split(batch_size)])
        finally:
            self.train(was_training)
        confidence, labels = probabilities.max(1)
        return labels, confidence


# ---- the directory format ---------------------------------------------------------------------
def save_classifier(net: ClassifierNet, path: str | os.PathLike) -> None:
    """Write ``config.json`` and ``model.safetensors`` into a directory, atomically."""
    with atomic_directory(path) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(net.config, indent=2))
        save_file({k: v.contiguous() for k, v in net.state_dict().items()},
                  str(tmp / WEIGHTS_NAME))


def read_classifier_config(path: str | os.PathLike) -> dict[str, Any]:
    """The constructor's arguments from ``<path>/config.json``, checked by name."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"evaluation classifier directory not found: {path} (expected "
                                f"a directory with {CONFIG_NAME} and {WEIGHTS_NAME}, as "
                                "written by ClassifierModule.save_pretrained)")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} is not a classifier directory: {name} is missing "
                                    f"(expected {CONFIG_NAME} and {WEIGHTS_NAME}, as written by "
                                    "save_pretrained)")
    try:
        config = json.loads((path / CONFIG_NAME).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path / CONFIG_NAME} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path / CONFIG_NAME} must hold a JSON object of ClassifierNet "
                         f"arguments, got {type(config).__name__}")
    known = set(inspect.signature(ClassifierNet).parameters)
    foreign = sorted(set(config) - known)
    if foreign:
        raise ValueError(f"{path / CONFIG_NAME} has keys {foreign} that a classifier does not "
                         f"take; expected some of {sorted(known)}")
    if "normalise" not in config:
        # Written before the evaluators standardised their input: such a classifier reads a
        # faint haze as another class, and its numbers cannot be trusted.
        raise ValueError(f"{path} holds a classifier without input standardisation (its "
                         f"{CONFIG_NAME} has no 'normalise' key): retrain it, e.g. "
                         "vdu fit --config configs/mnist5k/classifier.yaml")
    return config


def load_classifier(path: str | os.PathLike) -> ClassifierNet:
    """A ``ClassifierNet`` in eval mode from a directory written by ``save_classifier`` (or
    ``ClassifierModule.save_pretrained``); the weights must match the config exactly.

    Raises:
        FileNotFoundError: the directory or one of its two files is missing.
        ValueError: the config is not a classifier's, the weights are not a safetensors
            file, or they do not fit the config (another width, architecture, class count).
    """
    path = Path(path)
    config = read_classifier_config(path)
    try:
        net = ClassifierNet(**config)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path / CONFIG_NAME} does not describe a classifier: {err}") from err
    try:
        state = load_file(str(path / WEIGHTS_NAME))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path / WEIGHTS_NAME} is not a safetensors file ({err}); the "
                         "project reads classifier weights only as safetensors") from err
    expected = net.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(
            f"the weights in {path / WEIGHTS_NAME} do not fit its {CONFIG_NAME} ({config}): "
            + "; ".join(part for part in (
                f"missing {missing[:5]}" if missing else "",
                f"unexpected {unexpected[:5]}" if unexpected else "",
                f"other shapes for {wrong[:5]}" if wrong else "") if part))
    net.load_state_dict(state)
    return net.eval()
