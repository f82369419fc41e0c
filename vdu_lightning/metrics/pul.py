"""PUL, the percentage of unlearning: how many fewer forgotten-class samples the model makes.

Sample N images from the original and from the unlearned model with the same seeds; a
classifier counts those of the forgotten class(es) among each: n_orig and n_unl. Then
PUL = 100 · (n_orig − n_unl) / n_orig (docs/method.md §4).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric


def _as_labels(preds: Tensor, num_classes: int, what: str = "preds") -> Tensor:
    """Class indices ``[N]`` from indices ``[N]`` or scores ``[N, num_classes]`` (argmax)."""
    if not isinstance(preds, Tensor):
        raise TypeError(f"{what} must be a tensor, got {type(preds).__name__}")
    if preds.dim() == 2:
        if preds.shape[1] != num_classes:
            raise ValueError(f"{what} holds scores for {preds.shape[1]} classes, expected "
                             f"[N, {num_classes}] logits or probabilities, or [N] class indices")
        return preds.argmax(dim=1)
    if preds.dim() != 1:
        raise ValueError(f"{what} must be [N] class indices or [N, {num_classes}] scores, got "
                         f"shape {tuple(preds.shape)}")
    if preds.is_floating_point() or preds.is_complex() or preds.dtype == torch.bool:
        raise ValueError(f"{what} as a 1-D tensor must hold integer class indices, got dtype "
                         f"{preds.dtype} (scores must have shape [N, {num_classes}])")
    bad = (preds < 0) | (preds >= num_classes)
    if bad.any():
        values = sorted(set(preds[bad].tolist()))[:10]
        raise ValueError(f"{what} holds labels {values} outside [0, {num_classes - 1}] "
                         f"(num_classes={num_classes})")
    return preds.long()


def class_histogram(preds: Tensor, num_classes: int) -> Tensor:
    """How many predictions fall in each class: int64 ``[num_classes]``.

    Args:
        preds: class indices ``[N]``, or logits/probabilities ``[N, num_classes]`` (argmax).
        num_classes: number of classes.

    Example:
        >>> class_histogram(torch.tensor([0, 2, 2]), num_classes=4)
        tensor([1, 0, 2, 0])
    """
    return torch.bincount(_as_labels(preds, num_classes), minlength=num_classes)


def percent_unlearned(n_original: Tensor | int, n_unlearned: Tensor | int) -> Tensor:
    """PUL = 100 · (n_orig − n_unl) / n_orig, as a float32 tensor.

    Negative when the unlearned model makes *more* forgotten-class samples than the original.
    When ``n_original`` is 0 the original model made no sample of the forgotten classes, so
    there is nothing to unlearn and PUL is undefined: the result is ``nan``.

    Example:
        >>> percent_unlearned(40, 10)
        tensor(75.)
        >>> percent_unlearned(0, 3)
        tensor(nan)
    """
    n_orig = torch.as_tensor(n_original, dtype=torch.float64)
    n_unl = torch.as_tensor(n_unlearned, dtype=torch.float64, device=n_orig.device)
    if (n_orig < 0).any() or (n_unl < 0).any():
        raise ValueError(f"counts must be non-negative, got n_original={n_original}, "
                         f"n_unlearned={n_unlearned}")
    pul = torch.where(n_orig > 0, 100.0 * (n_orig - n_unl) / n_orig.clamp(min=1.0),
                      torch.full_like(n_orig, float("nan")))
    return pul.to(torch.float32)


class PercentUnlearned(Metric):
    """PUL over paired samples of the original and the unlearned model.

    Keeps one class histogram per model (summed across processes under DDP); PUL counts the
    samples predicted as any of ``forget_classes``.

    Args:
        num_classes: number of classes of the classifier.
        forget_classes: the forgotten labels.
        **kwargs: torchmetrics ``Metric`` arguments (``sync_on_compute``, ...).

    Example:
        >>> pul = PercentUnlearned(num_classes=4, forget_classes=[1])
        >>> pul.update(torch.tensor([1, 1, 1, 0]), torch.tensor([1, 2, 3, 0]))
        >>> pul.compute()
        tensor(66.6667)
        >>> pul.histograms()
        (tensor([1, 3, 0, 0]), tensor([1, 1, 1, 1]))
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    plot_upper_bound = 100.0

    original_counts: Tensor
    unlearned_counts: Tensor

    def __init__(self, num_classes: int, forget_classes: Sequence[int], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        forget = sorted(set(int(c) for c in forget_classes))
        if not forget:
            raise ValueError("forget_classes is empty: name at least one forgotten class")
        outside = [c for c in forget if not 0 <= c < num_classes]
        if outside:
            raise ValueError(f"forget_classes {outside} are outside [0, {num_classes - 1}] "
                             f"(num_classes={num_classes})")
        self.num_classes = num_classes
        self.forget_classes = forget
        zeros = torch.zeros(num_classes, dtype=torch.int64)
        self.add_state("original_counts", default=zeros.clone(), dist_reduce_fx="sum")
        self.add_state("unlearned_counts", default=zeros.clone(), dist_reduce_fx="sum")

    def update(self, original_preds: Tensor, unlearned_preds: Tensor) -> None:
        """Count one batch of paired predictions (sample i of both from the same noise).

        Args:
            original_preds: the original model's samples: class indices ``[N]`` or scores
                ``[N, num_classes]``.
            unlearned_preds: the unlearned model's samples, same form and length.
        """
        original = _as_labels(original_preds, self.num_classes, "original_preds")
        unlearned = _as_labels(unlearned_preds, self.num_classes, "unlearned_preds")
        if len(original) != len(unlearned):
            raise ValueError(f"the predictions must be paired: got {len(original)} original "
                             f"and {len(unlearned)} unlearned")
        self.original_counts += torch.bincount(original, minlength=self.num_classes)
        self.unlearned_counts += torch.bincount(unlearned, minlength=self.num_classes)

    def _forgotten(self, counts: Tensor) -> Tensor:
        return counts[torch.tensor(self.forget_classes, device=counts.device)].sum()

    def compute(self) -> Tensor:
        """PUL in percent (float32; nan when the original made no forgotten-class sample)."""
        return percent_unlearned(self._forgotten(self.original_counts),
                                 self._forgotten(self.unlearned_counts))

    def histograms(self) -> tuple[Tensor, Tensor]:
        """``(original_counts, unlearned_counts)``, summed over all processes."""
        # The same sync compute() gets; the local states are restored afterwards, so
        # accumulation can go on.
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, process_group=self.process_group,
                               should_sync=self._to_sync, should_unsync=self._should_unsync):
            return self.original_counts.clone(), self.unlearned_counts.clone()
