"""The benchmarks' evaluation (method.md §4): paired samples, PUL, u-FID, histograms.

N samples from the same seeded noise by the original and the unlearned model; the classifier
labels both (PUL, class histograms); u-FID on the classifier's features against the real
retained-class training images. The original's samples are cached beside the pre-trained
model (they never change), so each run samples only its own model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vdu_lightning import ClassifierModule
from vdu_lightning.diffusion import seeded_noise
from vdu_lightning.files import atomic_file
from vdu_lightning.metrics import PercentUnlearned, UnlearnedFID


def paired_samples(module: Any, pretrained: str, num: int, steps: int) -> tuple[torch.Tensor, ...]:
    """(original, unlearned) DDIM samples from the same noises (seed 0)."""
    noise = seeded_noise(num, module.sample_shape, seed=0)
    source = Path(pretrained)
    # Beside a checkpoint file, inside a diffusers directory.
    folder, prefix = (source.parent, f".{source.name}") if source.is_file() else (source, "")
    cache = folder / f"{prefix}.bench_original_{num}_{steps}.pt"
    if cache.is_file():
        original = torch.load(cache, weights_only=True)
    else:
        original = module.sample_from(noise, original=True, num_steps=steps)
        with atomic_file(cache) as tmp:
            torch.save(original, tmp)
    return original, module.sample_from(noise, original=False, num_steps=steps)


def retained_training_images(data: Any, forget: list[int]) -> torch.Tensor:
    """The real training images of every class but ``forget``: u-FID's reference."""
    train = data.load("train")
    retained = ~torch.isin(train.labels, torch.tensor(forget))
    return torch.stack([train[i]["image"] for i in torch.nonzero(retained).flatten().tolist()])


def evaluate(module: Any, data: Any, pretrained: str, classifier_dir: str, num: int,
             steps: int) -> dict[str, Any]:
    """PUL, u-FID of both models, their ratio, the histograms and the retained-class drift."""
    original, unlearned = paired_samples(module, pretrained, num, steps)
    classifier = ClassifierModule.from_pretrained(classifier_dir)
    forget = list(data.forget_classes)
    pul = PercentUnlearned(num_classes=10, forget_classes=forget)
    pul.update(classifier.predict_labels(original), classifier.predict_labels(unlearned))
    real = retained_training_images(data, forget)
    fids = {}
    for name, images in (("original", original), ("unlearned", unlearned)):
        fid = UnlearnedFID(classifier=classifier, sampler="ddim", num_steps=steps)
        fid.update(real, real=True)
        fid.update(images, real=False)
        fids[name] = float(fid.compute())
    hist_original, hist_unlearned = (h.double() for h in pul.histograms())
    keep = torch.ones(len(hist_original), dtype=torch.bool)
    keep[forget] = False
    # Total variation between the retained-class distributions: 0 = the same mix of digits.
    p, q = hist_original[keep], hist_unlearned[keep]
    drift = 0.5 * float((p / p.sum().clamp_min(1) - q / q.sum().clamp_min(1)).abs().sum())
    return {
        "pul": float(pul.compute()), "u_fid_name": fid.name, "u_fid": fids["unlearned"],
        "u_fid_original": fids["original"], "u_fid_ratio": fids["unlearned"] / fids["original"],
        "retained_drift": drift, "histogram_original": hist_original.long().tolist(),
        "histogram_unlearned": hist_unlearned.long().tolist(), "real_images": int(len(real)),
    }
