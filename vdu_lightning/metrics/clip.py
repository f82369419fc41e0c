"""The CLIP score of images against their prompts as a torchmetrics ``Metric`` (docs/method.md
§5): how well a text-to-image model still draws what it is asked for.

The score of image x with prompt p is 100 · cos(E_img(x), E_txt(p)); ``PromptCLIPScore`` is
their mean over images, clipped at 0, as torchmetrics' ``CLIPScore`` computes it. It is
computed here from the CLIP model's own outputs because torchmetrics 1.9's ``CLIPScore``
fails on the ``ModelOutput`` that transformers 5 returns (Lightning-AI/torchmetrics#3407).
The model and processor are the caller's (e.g. transformers' ``CLIPModel`` and
``CLIPProcessor`` read from a local directory): nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from typing_extensions import override

_MODEL_NEEDS = ("get_image_features", "get_text_features")


def _embedding(output: Any) -> Tensor:
    # transformers >= 5 returns a ModelOutput whose pooler_output is the projected embedding;
    # older versions the tensor itself.
    return output if isinstance(output, Tensor) else output.pooler_output


@torch.no_grad()
def clip_scores(model: nn.Module, processor: Any, images: Tensor,
                prompts: Sequence[str]) -> Tensor:
    """100 · cos(image, prompt embeddings) per image, float64 ``[B]`` on the CPU, as
    torchmetrics' CLIPScore computes it per sample. Images [B, 3, H, W] in [0, 1] go to the
    processor as uint8 pixels, as torchmetrics passes them."""
    device = next(model.parameters()).device
    pixels = (images.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    image_in = processor(images=list(pixels), return_tensors="pt")
    text_in = processor(text=list(prompts), return_tensors="pt", padding=True, truncation=True)
    image = _embedding(model.get_image_features(image_in["pixel_values"].to(device)))
    text = _embedding(model.get_text_features(text_in["input_ids"].to(device),
                                              text_in["attention_mask"].to(device)))
    image = image / image.norm(p=2, dim=-1, keepdim=True)
    text = text / text.norm(p=2, dim=-1, keepdim=True)
    return (100 * (image * text).sum(dim=-1)).double().cpu()


class PromptCLIPScore(Metric):
    """The mean CLIP score of images against their prompts, clipped at 0 (float64).

    Keeps the sum of the per-image scores and their count (both summed across processes
    under DDP), so the value over several updates, or several processes, is the value over
    all their images. Named apart from torchmetrics' ``CLIPScore``, which it equals.

    Args:
        model: a CLIP model with ``get_image_features(pixel_values)`` and
            ``get_text_features(input_ids, attention_mask)`` (e.g. transformers'
            ``CLIPModel``); frozen here, and kept in eval mode whatever the metric's mode.
        processor: its processor, called as ``processor(images=..., return_tensors="pt")``
            and ``processor(text=..., return_tensors="pt", padding=True, truncation=True)``.
        **kwargs: torchmetrics ``Metric`` arguments (``sync_on_compute``, ...).

    Example:
        >>> from transformers import CLIPModel, CLIPProcessor  # doctest: +SKIP
        >>> clip = PromptCLIPScore(CLIPModel.from_pretrained("models/clip"),  # doctest: +SKIP
        ...                        CLIPProcessor.from_pretrained("models/clip"))
        >>> clip.update(torch.rand(2, 3, 224, 224), ["a cat", "a dog"])  # doctest: +SKIP
        >>> clip.compute()  # doctest: +SKIP
        tensor(21.3721, dtype=torch.float64)
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 100.0

    score_sum: Tensor
    num_images: Tensor

    def __init__(self, model: nn.Module, processor: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        missing = [name for name in _MODEL_NEEDS if not callable(getattr(model, name, None))]
        if not isinstance(model, nn.Module) or missing:
            raise TypeError(f"model must be a CLIP nn.Module with {list(_MODEL_NEEDS)} (e.g. "
                            f"transformers' CLIPModel), got {type(model).__name__}")
        if not callable(processor):
            raise TypeError(f"processor must be callable (e.g. transformers' CLIPProcessor), "
                            f"got {type(processor).__name__}")
        self.model = model.requires_grad_(False).eval()
        self.processor = processor
        self.add_state("score_sum", default=torch.tensor(0.0, dtype=torch.float64),
                       dist_reduce_fx="sum")
        self.add_state("num_images", default=torch.tensor(0, dtype=torch.int64),
                       dist_reduce_fx="sum")

    @override
    def train(self, mode: bool = True) -> "PromptCLIPScore":
        # A LightningModule holding the metric puts its children in train mode during fit:
        # CLIP's dropout would then move the scores.
        super().train(mode)
        self.model.eval()
        return self

    def image_scores(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Each image's score against its prompt, float64 ``[B]`` on the CPU; the states are
        left as they are.

        Args:
            images: ``[B, 3, H, W]`` floats in [0, 1].
            prompts: one text per image.
        """
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3 or (
                not images.is_floating_point()):
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must be a float [B, 3, H, W] tensor in [0, 1], got "
                             f"{shape}")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(prompts) != len(images) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"give one prompt (a str) per image: {len(images)} images, "
                             f"prompts {prompts!r}")
        return clip_scores(self.model, self.processor, images, prompts)

    @override
    def update(self, images: Tensor | None = None, prompts: Sequence[str] | None = None, *,
               scores: Tensor | None = None) -> None:
        """Add images with their prompts; or per-image scores that ``image_scores`` gave, for
        a caller that reports them too and should not run CLIP twice.

        Args:
            images: ``[B, 3, H, W]`` floats in [0, 1].
            prompts: one text per image.
            scores: instead of both, ``[B]`` per-image scores.
        """
        if scores is None:
            if images is None or prompts is None:
                raise TypeError("update needs images and prompts, or scores")
            scores = self.image_scores(images, prompts)
        elif images is not None or prompts is not None:
            raise TypeError("give images and prompts, or scores, not both")
        scores = torch.as_tensor(scores)
        if scores.dim() != 1:
            raise ValueError(f"scores must be one per image, [B], got shape "
                             f"{tuple(scores.shape)}")
        self.score_sum += scores.to(self.score_sum).sum()
        self.num_images += len(scores)

    @override
    def compute(self) -> Tensor:
        """The mean score clipped at 0, float64 (nan before any image)."""
        return (self.score_sum / self.num_images).clamp_min(0.0)
