"""Photometric changes of images in [-1, 1]: the evaluator's training augmentation, and the
fixed perturbations its robustness is measured under.

A generator can change intensity, contrast, noise or sharpness a little without drawing
another digit; an evaluator that reads such changes as another class would credit them as
forgetting. Every result is clipped to [-1, 1], as generated samples are.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def offset(images: Tensor, amount: float) -> Tensor:
    """A uniform intensity offset (a haze for ``amount`` > 0)."""
    return (images + amount).clamp(-1.0, 1.0)


def contrast(images: Tensor, factor: float | Tensor) -> Tensor:
    """Contrast about each image's mean, as ``torchvision``'s ``adjust_contrast``."""
    factor = torch.as_tensor(factor, dtype=images.dtype, device=images.device)
    factor = factor.view(-1, *[1] * (images.dim() - 1)) if factor.dim() else factor
    mean = images.flatten(1).mean(1).view(-1, *[1] * (images.dim() - 1))
    return (mean + factor * (images - mean)).clamp(-1.0, 1.0)


def gaussian_noise(images: Tensor, std: float | Tensor,
                   generator: torch.Generator | None = None) -> Tensor:
    """Independent Gaussian noise of deviation ``std`` on every pixel."""
    std = torch.as_tensor(std, dtype=images.dtype, device=images.device)
    std = std.view(-1, *[1] * (images.dim() - 1)) if std.dim() else std
    noise = torch.randn(images.shape, generator=generator, device=images.device,
                        dtype=images.dtype)
    return (images + std * noise).clamp(-1.0, 1.0)


def box_blur(images: Tensor, size: int = 3) -> Tensor:
    """The mean over a ``size`` × ``size`` window (edges replicated)."""
    channels = images.shape[1]
    kernel = images.new_full((channels, 1, size, size), 1.0 / size**2)
    padded = F.pad(images, [size // 2] * 4, mode="replicate")
    return F.conv2d(padded, kernel, groups=channels)


def random_shift(images: Tensor, max_shift: int,
                 generator: torch.Generator | None = None) -> Tensor:
    """Translate each image by up to ``max_shift`` pixels (padding with the background, −1)."""
    if max_shift == 0:
        return images
    batch, _, height, width = images.shape
    padded = F.pad(images, [max_shift] * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, batch), device=images.device,
                           generator=generator)
    rows = (dy[:, None] + torch.arange(height, device=images.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(width, device=images.device))[:, None, None, :]
    index = torch.arange(batch, device=images.device)[:, None, None, None]
    channel = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return padded[index, channel, rows, cols]


def _uniform(batch: int, low: float, high: float, like: Tensor,
             generator: torch.Generator | None) -> Tensor:
    return low + (high - low) * torch.rand(batch, generator=generator, device=like.device,
                                           dtype=like.dtype)


def augment(images: Tensor, max_shift: int = 2,
            generator: torch.Generator | None = None) -> Tensor:
    """The evaluator's training augmentation: per image a random shift, offset (±0.25),
    contrast (×0.7–1.3), and on half of the images each Gaussian noise (σ up to 0.15) and
    a 3×3 blur. The ranges cover the measured perturbations (``PERTURBATIONS``) with a
    margin."""
    batch = images.shape[0]
    view = (-1, *[1] * (images.dim() - 1))
    x = random_shift(images, max_shift, generator)
    x = contrast(x + _uniform(batch, -0.25, 0.25, x, generator).view(view),
                 _uniform(batch, 0.7, 1.3, x, generator))
    noisy = torch.rand(batch, generator=generator, device=x.device) < 0.5
    sigma = _uniform(batch, 0.0, 0.15, x, generator) * noisy
    x = gaussian_noise(x, sigma, generator)
    blurred = (torch.rand(batch, generator=generator, device=x.device) < 0.5).view(view)
    return torch.where(blurred, box_blur(x), x)


#: The perturbations the evaluators' robustness is measured under (benchmarks/evaluators.py),
#: each a function of (images, generator).
PERTURBATIONS: dict[str, Callable[[Tensor, torch.Generator], Tensor]] = {
    "none": lambda x, g: x,
    "offset +0.1": lambda x, g: offset(x, 0.1),
    "offset -0.1": lambda x, g: offset(x, -0.1),
    "offset +0.2": lambda x, g: offset(x, 0.2),
    "offset -0.2": lambda x, g: offset(x, -0.2),
    "contrast x0.8": lambda x, g: contrast(x, 0.8),
    "contrast x1.2": lambda x, g: contrast(x, 1.2),
    "noise sigma 0.1": lambda x, g: gaussian_noise(x, 0.1, g),
    "blur 3x3": lambda x, g: box_blur(x, 3),
}
