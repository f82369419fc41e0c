"""Concept detectors for the text-to-image evaluation tests, importable by path
("detectors.ChannelMean"): scores are simple functions of the pixels, so that a test can
count by hand which images "show the concept"."""

from __future__ import annotations

import torch
from torch import nn

#: Not callable: the evaluation must refuse it as a detector.
NOT_A_DETECTOR = 0.5


class ChannelMean(nn.Module):
    """Score: the mean of one channel (0: red) of each image [B, 3, H, W] in [0, 1]."""

    def __init__(self, channel: int = 0) -> None:
        super().__init__()
        self.channel = channel

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images[:, self.channel].mean(dim=(1, 2))


def mean_brightness(images: torch.Tensor) -> torch.Tensor:
    """A function detector: the mean of all channels."""
    return images.mean(dim=(1, 2, 3))
