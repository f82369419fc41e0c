"""Comparing the same-seed samples of an original and an unlearned model.

Sample i of both sets comes from the same noise. ``PairedEvaluation`` reads both sets with
one or more evaluation classifiers (``ClassifierNet``) and reports, per evaluator, PUL, u-FID
of both sets against real retained-class images and its ratio, the class histograms and the
drift of the retained-class mix; and, with no classifier in the measure itself, how much
each seed's sample changed (split by whether the original drew a forgotten class) and how
the samples' overall and background intensity moved.

Why all of these: a generator can move a brittle classifier's labels with a faint global
haze and forget nothing. The evaluators are intensity-standardised; two of them must agree
(``evaluators_disagree`` flags a PUL gap over ``disagreement`` points, and is None when a
PUL is undefined); and a selective
method changes the forgotten seeds' samples much more than the retained ones', with no
global drift. Everything is computed from the full sets on one process: pass gathered
samples under DDP.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from vdu_lightning.evaluation.classifier import ClassifierNet
from vdu_lightning.metrics import PercentUnlearned, UnlearnedFID


def border_width(height: int) -> int:
    """The background border of an image: its outer fifth (3 pixels of 16, 6 of 32)."""
    return max(1, height // 5)


def intensity(images: Tensor) -> tuple[float, float]:
    """(mean pixel value, mean of the border pixels) of a set of images."""
    width = border_width(images.shape[-2])
    inner = torch.zeros(images.shape[-2:], dtype=torch.bool)
    inner[width:-width, width:-width] = True
    return float(images.mean()), float(images[..., ~inner].mean())


def u_fid_ratio(original: float, unlearned: float) -> float:
    """u-FID(unlearned) / u-FID(original): 1 when unlearning left the retained classes' images
    as they were (nan when the original's u-FID is not positive)."""
    return unlearned / original if original > 0 else float("nan")


def sample_fid(metric: UnlearnedFID, images: Tensor, batch_size: int) -> float:
    """u-FID of ``images`` against the real images already in ``metric``; its sample side is
    reset before and after (the real one is kept)."""
    metric.reset()
    for chunk in images.split(batch_size):
        metric.update(chunk.to(metric.device).float(), real=False)
    value = float(metric.compute())
    metric.reset()
    return value


def retained_drift(original: Tensor, unlearned: Tensor, forget: Sequence[int]) -> float:
    """Total variation between the two histograms restricted to the retained classes
    (0: the same mix of retained classes; 1: disjoint)."""
    keep = torch.ones(len(original), dtype=torch.bool)
    keep[list(forget)] = False
    p, q = original[keep].double(), unlearned[keep].double()
    return 0.5 * float((p / p.sum().clamp_min(1) - q / q.sum().clamp_min(1)).abs().sum())


def sample_change(original: Tensor, unlearned: Tensor, forgotten: Tensor) -> dict[str, Any]:
    """Mean absolute pixel change per seed, over the seeds whose original sample is of a
    forgotten class and over the others; a selective method changes the first much more."""
    change = (unlearned.float() - original.float()).abs().flatten(1).mean(1)

    def mean(mask: Tensor) -> float | None:
        return float(change[mask].mean()) if mask.any() else None

    retained, forgot = mean(~forgotten), mean(forgotten)
    ratio = forgot / retained if forgot is not None and retained else None
    return {"retained": retained, "forgotten": forgot, "ratio": ratio,
            "retained_seeds": int((~forgotten).sum()), "forgotten_seeds": int(forgotten.sum())}


class PairedEvaluation:
    """Scores paired sample sets with every evaluator, against fixed real reference images.

    Args:
        evaluators: name → ``ClassifierNet`` (the first is the primary one, whose labels
            split the seeds for ``sample_change``).
        forget_classes: the forgotten labels.
        reference: real images of the retained classes ``[M, C, H, W]`` in [−1, 1], FID's
            real side (their statistics are computed once).
        sampler, num_steps: how the samples were drawn, recorded in the FID's name.
        disagreement: the PUL gap (points) between evaluators that is flagged.
        batch_size: images per classifier pass.

    Example:
        >>> nets = {"a": ClassifierNet(width=8), "b": ClassifierNet(width=8, architecture="lenet")}
        >>> paired = PairedEvaluation(nets, [1], torch.rand(40, 1, 16, 16) * 2 - 1)
        >>> result = paired.compare(torch.rand(30, 1, 16, 16), torch.rand(30, 1, 16, 16))
        >>> sorted(result["evaluators"]), "sample_change" in result
        (['a', 'b'], True)
    """

    def __init__(self, evaluators: Mapping[str, ClassifierNet], forget_classes: Sequence[int],
                 reference: Tensor, sampler: str = "ddim", num_steps: int = 50,
                 disagreement: float = 10.0, batch_size: int = 500) -> None:
        if not evaluators:
            raise ValueError("give at least one evaluator")
        classes = {net.num_classes for net in evaluators.values()}
        if len(classes) != 1:
            raise ValueError(f"the evaluators disagree on the number of classes: {classes}")
        self.evaluators = dict(evaluators)
        self.num_classes = classes.pop()
        self.forget_classes = sorted(set(int(c) for c in forget_classes))
        self.disagreement = disagreement
        self.batch_size = batch_size
        self.fids: dict[str, UnlearnedFID] = {}
        for name, net in self.evaluators.items():
            # One process scores the full sets: no syncing (it would count them twice).
            fid = UnlearnedFID(classifier=net, sampler=sampler, num_steps=num_steps,
                               sync_on_compute=False)
            for chunk in reference.split(batch_size):
                fid.update(chunk.to(fid.device), real=True)
            self.fids[name] = fid
        self.reference_count = len(reference)

    def to(self, device: torch.device | str) -> "PairedEvaluation":
        for name in self.evaluators:
            self.evaluators[name] = self.evaluators[name].to(device)
            self.fids[name] = self.fids[name].to(device)
        return self

    @property
    def primary(self) -> str:
        return next(iter(self.evaluators))

    def fid_name(self, evaluator: str) -> str:
        return self.fids[evaluator].name

    def read(self, images: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        """Each evaluator's (labels, confidences) of ``images``, on the CPU."""
        return {name: net.predict(images, self.batch_size)
                for name, net in self.evaluators.items()}

    def fid(self, evaluator: str, images: Tensor) -> float:
        """u-FID of ``images`` against the reference on one evaluator's features."""
        return sample_fid(self.fids[evaluator], images, self.batch_size)

    def compare(self, original: Tensor, unlearned: Tensor) -> dict[str, Any]:
        """Every measure of the pair (see the module); plain numbers and lists."""
        if original.shape != unlearned.shape:
            raise ValueError(f"the sample sets must be paired: shapes {tuple(original.shape)} "
                             f"and {tuple(unlearned.shape)}")
        readings = {"original": self.read(original), "unlearned": self.read(unlearned)}
        per_evaluator = {name: self._scores(name, original, unlearned, readings)
                         for name in self.evaluators}
        # The gap needs every evaluator's PUL: undefined (None) when one is NaN, i.e. when
        # that evaluator found no forgotten-class sample among the original's.
        puls = [r["pul"] for r in per_evaluator.values()]
        defined = len(puls) > 1 and all(math.isfinite(value) for value in puls)
        gap = max(puls) - min(puls) if defined else None
        forget = torch.tensor(self.forget_classes)
        forgotten = torch.isin(readings["original"][self.primary][0], forget)
        mean_o, background_o = intensity(original)
        mean_u, background_u = intensity(unlearned)
        return {
            "evaluators": per_evaluator,
            "primary": self.primary,
            "pul_disagreement": gap,
            "evaluators_disagree": None if gap is None else gap > self.disagreement,
            "disagreement_threshold": self.disagreement,
            "sample_change": sample_change(original, unlearned, forgotten),
            "intensity": {"mean_original": mean_o, "mean_unlearned": mean_u,
                          "mean_shift": mean_u - mean_o, "background_original": background_o,
                          "background_unlearned": background_u,
                          "background_shift": background_u - background_o,
                          "border_pixels": border_width(original.shape[-2])},
            "num_samples": len(original),
            "num_reference": self.reference_count,
        }

    def _scores(self, name: str, original: Tensor, unlearned: Tensor,
                readings: dict[str, dict[str, tuple[Tensor, Tensor]]]) -> dict[str, Any]:
        pul = PercentUnlearned(self.num_classes, self.forget_classes, sync_on_compute=False)
        pul.update(readings["original"][name][0], readings["unlearned"][name][0])
        hist_o, hist_u = pul.original_counts, pul.unlearned_counts
        fid_o, fid_u = self.fid(name, original), self.fid(name, unlearned)
        forgotten = self.forget_classes
        return {
            "pul": float(pul.compute()),
            "u_fid_name": self.fid_name(name),
            "u_fid": fid_u,
            "u_fid_original": fid_o,
            "u_fid_ratio": u_fid_ratio(fid_o, fid_u),
            "histogram_original": hist_o.tolist(),
            "histogram_unlearned": hist_u.tolist(),
            "forget_fraction_original": float(hist_o[forgotten].sum()) / len(original),
            "forget_fraction_unlearned": float(hist_u[forgotten].sum()) / len(original),
            "retained_drift": retained_drift(hist_o, hist_u, forgotten),
        }
