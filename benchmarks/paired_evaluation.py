"""The benchmarks' evaluation (method.md §4), the same as ``UnlearningEvaluation``'s.

N samples from the same seeded noise by the original and the unlearned model, compared by
``vdu_lightning.evaluation.PairedEvaluation`` with both evaluators (PUL, u-FID and its ratio,
histograms, retained drift, their PUL gap; same-seed sample change and intensity drift), and
the variational bound of the held-out real forget and retain images under both models. The
original's samples and bound are cached beside the pre-trained model, keyed by its weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vdu_lightning.diffusion import seeded_noise
from vdu_lightning.evaluation import (
    PairedEvaluation,
    likelihood_change,
    load_classifier,
    variational_bound,
)
from vdu_lightning.evaluation.cache import OriginalCache, state_digest
from vdu_lightning.evaluation.likelihood import Likelihood

#: Monte Carlo timesteps per held-out image for the bound (as the callback's default).
LIKELIHOOD_TIMESTEPS = 8


def cache_folder(pretrained: str) -> Path:
    """Where the original's results are kept: inside a diffusers directory, beside a file."""
    source = Path(pretrained)
    return source.parent / f".{source.name}.evaluation" if source.is_file() else source / (
        ".evaluation")


def held_out_images(data: Any) -> dict[str, torch.Tensor]:
    """The datamodule's held-out forget and retain images (set up by fit)."""
    return {part: torch.stack([item["image"] for item in getattr(data, f"{part}_eval_set")])
            for part in ("forget", "retain")}


def original_results(module: Any, pretrained: str, held_out: dict[str, torch.Tensor],
                     num: int, steps: int) -> dict[str, Any]:
    """The original model's samples (seed 0) and bound, from the cache or computed."""
    cache = OriginalCache(cache_folder(pretrained))
    key = cache.key(model=state_digest(module.original_unet), num_samples=num, steps=steps,
                    seed=0, timesteps=LIKELIHOOD_TIMESTEPS,
                    held_out={part: list(images.shape) for part, images in held_out.items()})
    entry = cache.load(key)
    if entry is None:
        noise = seeded_noise(num, module.sample_shape, seed=0)
        entry = {"samples": module.sample_from(noise, original=True, num_steps=steps),
                 "likelihood": {part: vars(bound) for part, bound in
                                bounds(module, held_out, original=True).items()}}
        cache.store(key, entry)
    return {"samples": entry["samples"],
            "likelihood": {part: Likelihood(**values)
                           for part, values in entry["likelihood"].items()}}


def bounds(module: Any, held_out: dict[str, torch.Tensor], original: bool
           ) -> dict[str, Likelihood]:
    unet = module.original_unet if original else module.unet
    return {part: variational_bound(unet, module.scheduler.betas, images,
                                    timesteps=LIKELIHOOD_TIMESTEPS)
            for part, images in held_out.items()}


def retained_training_images(data: Any, forget: list[int]) -> torch.Tensor:
    """The real training images of every class but ``forget``: u-FID's reference."""
    train = data.load("train")
    retained = ~torch.isin(train.labels, torch.tensor(forget))
    return torch.stack([train[i]["image"] for i in torch.nonzero(retained).flatten().tolist()])


def evaluators(classifier_dirs: list[str]) -> dict[str, Any]:
    """Name (the directory's) → ``ClassifierNet``; the first is the primary evaluator."""
    return {Path(path).name: load_classifier(path) for path in classifier_dirs}


def flat_scores(paired: dict[str, Any], likelihood: dict[str, Any] | None) -> dict[str, Any]:
    """The numbers the tables use: the primary evaluator's, the second's PUL and ratio, and
    the classifier-free measures."""
    names = list(paired["evaluators"])
    primary = paired["evaluators"][names[0]]
    scores = {key: primary[key] for key in ("pul", "u_fid", "u_fid_original", "u_fid_ratio",
                                            "retained_drift")}
    scores["u_fid_name"] = primary["u_fid_name"]
    scores["histogram_original"] = primary["histogram_original"]
    scores["histogram_unlearned"] = primary["histogram_unlearned"]
    if len(names) > 1:
        second = paired["evaluators"][names[1]]
        scores.update(second_pul=second["pul"], second_u_fid_ratio=second["u_fid_ratio"],
                      second_retained_drift=second["retained_drift"],
                      pul_disagreement=paired["pul_disagreement"])
    change = paired["sample_change"]
    scores.update(change_forgotten=change["forgotten"], change_retained=change["retained"],
                  change_ratio=change["ratio"],
                  background_shift=paired["intensity"]["background_shift"],
                  mean_shift=paired["intensity"]["mean_shift"])
    if likelihood is not None:
        scores.update(bpd_forget_increase=likelihood["forget"]["bits_per_dim_increase"],
                      bpd_retain_increase=likelihood["retain"]["bits_per_dim_increase"],
                      bpd_selectivity=likelihood["selectivity"])
    return scores


def evaluate(module: Any, data: Any, pretrained: str, classifier_dirs: list[str], num: int,
             steps: int) -> dict[str, Any]:
    """Every measure of the unlearned ``module`` against its original (see the module)."""
    held_out = held_out_images(data)
    original = original_results(module, pretrained, held_out, num, steps)
    noise = seeded_noise(num, module.sample_shape, seed=0)
    unlearned = module.sample_from(noise, original=False, num_steps=steps)
    forget = list(data.forget_classes)
    paired = PairedEvaluation(evaluators(classifier_dirs), forget,
                              retained_training_images(data, forget), num_steps=steps
                              ).compare(original["samples"], unlearned)
    likelihood = likelihood_change(original["likelihood"], bounds(module, held_out, False))
    return {**flat_scores(paired, likelihood), "paired": paired, "likelihood": likelihood,
            "real_images": paired["num_reference"]}
