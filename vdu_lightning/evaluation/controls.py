"""The controls every evaluation must pass before its numbers are believed (docs/method.md §4).

Given the original model's samples, each control builds an "unlearned" set whose right score
is known:

* identity: the samples themselves (PUL 0, u-FID ratio 1);
* haze: the samples with a uniform intensity offset: nothing is forgotten, so PUL must stay
  near 0 and u-FID near the original's (``haze_control``);
* perfect forgetter: every sample of a forgotten class replaced by a real image of a retained
  class: PUL must be near 100 and u-FID no worse (``perfect_forgetter_control``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from vdu_lightning.evaluation.photometric import offset


def haze_control(samples: Tensor, amount: float = 0.075) -> Tensor:
    """The samples with a uniform offset (clipped to [−1, 1], as samples are)."""
    return offset(samples, amount)


def perfect_forgetter_control(samples: Tensor, labels: Tensor, forget_classes: Sequence[int],
                              retained_images: Tensor, seed: int = 0) -> Tensor:
    """The samples with each one labelled a forgotten class replaced by a real retained-class
    image, drawn without replacement from ``retained_images`` with ``seed``.

    Example:
        >>> samples, labels = torch.zeros(4, 1, 2, 2), torch.tensor([1, 0, 1, 2])
        >>> out = perfect_forgetter_control(samples, labels, [1], torch.ones(5, 1, 2, 2))
        >>> out[:, 0, 0, 0].tolist()
        [1.0, 0.0, 1.0, 0.0]
    """
    forgotten = torch.nonzero(torch.isin(labels.cpu(), torch.tensor(list(forget_classes))))
    forgotten = forgotten.flatten()
    if len(forgotten) > len(retained_images):
        raise ValueError(f"{len(forgotten)} samples to replace but only "
                         f"{len(retained_images)} retained images")
    order = torch.randperm(len(retained_images), generator=torch.Generator().manual_seed(seed))
    replaced = samples.clone()
    replaced[forgotten] = retained_images[order[:len(forgotten)]].to(samples)
    return replaced
