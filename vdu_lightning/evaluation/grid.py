"""Before/after pictures a person can read: same-seed samples side by side, upscaled, each
captioned with what the evaluator reads in it.

A number is believed only after looking at the samples behind it. Small samples (16×16) are
enlarged without smoothing to at least ``tile`` pixels; under each sample goes the
evaluator's label and confidence; a sample whose *original* is of a forgotten class is
framed in red in both panels, so that one sees at a glance what became of it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

_FORGOTTEN = (220, 30, 30)
_BACKGROUND = (255, 255, 255)
_TEXT = (0, 0, 0)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _tile(image: Tensor, side: int) -> Image.Image:
    pixels = ((image.float().clamp(-1, 1) + 1) * 127.5).round().byte().cpu()
    array = pixels.permute(1, 2, 0).numpy()
    array = np.repeat(array, 3, axis=2) if array.shape[2] == 1 else array
    return Image.fromarray(array, "RGB").resize((side, side), Image.Resampling.NEAREST)


def _panel(images: Tensor, labels: Tensor, confidences: Tensor, marked: Tensor, title: str,
           columns: int, tile: int) -> Image.Image:
    font, caption = _font(max(10, tile // 6)), max(12, tile // 5) + 2
    frame, gap = max(2, tile // 24), max(4, tile // 12)
    cell_w, cell_h = tile + 2 * frame + gap, tile + 2 * frame + caption + gap
    rows = math.ceil(len(images) / columns)
    header = caption + gap
    panel = Image.new("RGB", (columns * cell_w + gap, header + rows * cell_h), _BACKGROUND)
    draw = ImageDraw.Draw(panel)
    draw.text((gap, gap // 2), title, fill=_TEXT, font=font)
    for i, image in enumerate(images):
        x = gap + (i % columns) * cell_w
        y = header + (i // columns) * cell_h
        if marked[i]:
            draw.rectangle([x, y, x + tile + 2 * frame - 1, y + tile + 2 * frame - 1],
                           fill=_FORGOTTEN)
        panel.paste(_tile(image, tile), (x + frame, y + frame))
        draw.text((x + frame, y + tile + 2 * frame + 1),
                  f"{int(labels[i])} {float(confidences[i]):.2f}", fill=_TEXT, font=font)
    return panel


def before_after_grid(original: Tensor, unlearned: Tensor,
                      original_reading: tuple[Tensor, Tensor],
                      unlearned_reading: tuple[Tensor, Tensor], forget_classes: list[int],
                      evaluator: str = "evaluator", tile: int = 64,
                      columns: int | None = None) -> Image.Image:
    """Two panels, original left and unlearned right, one tile per seed in the same place.

    Args:
        original, unlearned: paired samples ``[N, C, H, W]`` in [−1, 1].
        original_reading, unlearned_reading: an evaluator's (labels, confidences) of each.
        forget_classes: a seed whose original label is one of these is framed in red.
        evaluator: its name, in the panel titles.
        tile: pixels per sample side (at least 64 keeps a 16×16 digit readable).
        columns: tiles per row (default: about square).

    Example:
        >>> images = torch.rand(4, 1, 16, 16) * 2 - 1
        >>> reading = (torch.tensor([1, 0, 2, 1]), torch.full((4,), 0.9))
        >>> before_after_grid(images, images, reading, reading, [1]).size[1] > 128
        True
    """
    if original.shape != unlearned.shape:
        raise ValueError(f"the sample sets must be paired: shapes {tuple(original.shape)} and "
                         f"{tuple(unlearned.shape)}")
    columns = columns or math.ceil(math.sqrt(len(original)))
    marked = torch.isin(original_reading[0].cpu(), torch.tensor(forget_classes))
    forgotten = ", ".join(str(c) for c in forget_classes)
    left = _panel(original, *original_reading, marked,
                  f"original  (label confidence by {evaluator}; red: originals of {forgotten})",
                  columns, tile)
    right = _panel(unlearned, *unlearned_reading, marked, "unlearned, same seeds", columns,
                   tile)
    gap = max(8, tile // 4)
    both = Image.new("RGB", (left.width + gap + right.width, max(left.height, right.height)),
                     _BACKGROUND)
    both.paste(left, (0, 0))
    both.paste(right, (left.width + gap, 0))
    return both
