"""The benchmarks' evaluation (docs/method.md §4), the same as ``UnlearningEvaluation``'s.

N samples from the same seeded noise (seed 0) by the original and the unlearned model,
compared by ``vdu_lightning.evaluation.PairedEvaluation`` with both evaluators (PUL, u-FID and
its ratio, histograms, retained drift, their PUL gap; same-seed sample change and intensity
drift), and the variational bound of the held-out real forget and retain images under both
models. The original's samples and bound are cached beside the pre-trained model, keyed as
the callback keys them (``evaluation.cache.original_key``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vdu_lightning.diffusion import seeded_noise
from vdu_lightning.evaluation import (
    PairedEvaluation,
    before_after_grid,
    likelihood_change,
    load_classifier,
    variational_bound,
)
from vdu_lightning.evaluation.cache import OriginalCache, from_entry, original_key, to_entry
from vdu_lightning.evaluation.likelihood import Likelihood
from vdu_lightning.evaluation.references import held_out_parts, retained_reference
from vdu_lightning.files import atomic_file

#: Monte Carlo timesteps per held-out image for the bound (as the callback's default).
LIKELIHOOD_TIMESTEPS = 8


def cache_folder(pretrained: str) -> Path:
    """Where the original's results are kept: inside a diffusers directory, beside a file."""
    source = Path(pretrained)
    return source.parent / f".{source.name}.evaluation" if source.is_file() else source / (
        ".evaluation")


def labels_of(module: Any, num: int) -> torch.Tensor | None:
    """The labels a label-conditional model samples with (sample i: i mod C), as the
    callback's; None for an unconditional one."""
    return torch.arange(num) % module.num_classes if module.conditional else None


def bounds(module: Any, held_out: dict[str, tuple[torch.Tensor, torch.Tensor]],
           original: bool) -> dict[str, Likelihood]:
    unet = module.original_unet if original else module.unet
    return {part: variational_bound(unet, module.scheduler.betas, images,
                                    labels if module.conditional else None,
                                    timesteps=LIKELIHOOD_TIMESTEPS)
            for part, (images, labels) in held_out.items()}


def original_results(module: Any, pretrained: str,
                     held_out: dict[str, tuple[torch.Tensor, torch.Tensor]], num: int,
                     steps: int) -> tuple[torch.Tensor, dict[str, Likelihood]]:
    """The original model's samples and bound, from the cache or computed."""
    cache = OriginalCache(cache_folder(pretrained))
    parts = {f"{part}_{what}": tensor for part, pair in held_out.items()
             for what, tensor in zip(("images", "labels"), pair)}
    key = original_key(module.original_unet, module.scheduler.config,
                       shape=list(module.sample_shape), num_samples=num, seed=0,
                       num_steps=steps, sampler="ddim", conditional=module.conditional,
                       likelihood_timesteps=LIKELIHOOD_TIMESTEPS, **parts)
    entry = cache.load(key)
    if entry is None:
        noise = seeded_noise(num, module.sample_shape, seed=0)
        samples = module.sample_from(noise, original=True, num_steps=steps,
                                     labels=labels_of(module, num))
        entry = to_entry(samples, bounds(module, held_out, original=True))
        cache.store(key, entry)
    return from_entry(entry)


def evaluators(classifier_dirs: list[str]) -> dict[str, Any]:
    """Name (the directory's, or its whole path where two share one) → ``ClassifierNet``; the
    first is the primary evaluator."""
    names = [Path(path).name for path in classifier_dirs]
    if len(set(names)) < len(names):
        names = [str(path) for path in classifier_dirs]
    return {name: load_classifier(path) for name, path in zip(names, classifier_dirs)}


def flat_scores(paired: dict[str, Any], likelihood: dict[str, Any] | None) -> dict[str, Any]:
    """The numbers the tables use: the primary evaluator's, the second's PUL and ratio, and
    the classifier-free measures."""
    names = list(paired["evaluators"])
    primary = paired["evaluators"][names[0]]
    scores = {key: primary[key] for key in ("pul", "u_fid", "u_fid_original", "u_fid_ratio",
                                            "retained_drift", "u_fid_name",
                                            "histogram_original", "histogram_unlearned")}
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
                      bpd_forget_minus_retain=likelihood["forget_minus_retain"],
                      bpd_selectivity=likelihood["selectivity"])
    return scores


def evaluate(module: Any, data: Any, pretrained: str, classifier_dirs: list[str], num: int,
             steps: int) -> dict[str, Any]:
    """Every measure of the unlearned ``module`` against its original (see the module)."""
    held_out = held_out_parts(data)
    original, original_bounds = original_results(module, pretrained, held_out, num, steps)
    noise = seeded_noise(num, module.sample_shape, seed=0)
    unlearned = module.sample_from(noise, original=False, num_steps=steps,
                                   labels=labels_of(module, num))
    reference = retained_reference(data, "train")
    paired = PairedEvaluation(evaluators(classifier_dirs), data.forget_classes, reference,
                              num_steps=steps).compare(original, unlearned)
    likelihood = likelihood_change(original_bounds, bounds(module, held_out, original=False))
    return {**flat_scores(paired, likelihood), "paired": paired, "likelihood": likelihood,
            "real_images": paired["num_reference"]}


def save_before_after(module: Any, classifier_dir: str, forget: int, steps: int, path: str,
                      count: int = 32, seeds: torch.Tensor | None = None, num: int = 0) -> None:
    """The captioned before/after grid of the first ``count`` seeds (the evaluation's noise),
    as ``UnlearningEvaluation`` draws it; or of the given ``seeds`` (indices into the
    evaluation's ``num`` noise tensors)."""
    noise = seeded_noise(max(count, num), module.sample_shape, seed=0)
    labels = labels_of(module, len(noise))
    chosen = torch.arange(count) if seeds is None else seeds
    labels = None if labels is None else labels[chosen]
    pair = [module.sample_from(noise[chosen], original=original, num_steps=steps,
                               labels=labels) for original in (True, False)]
    net = load_classifier(classifier_dir)
    picture = before_after_grid(*pair, *(net.predict(images) for images in pair), [forget],
                                evaluator=Path(classifier_dir).name)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        picture.save(tmp, format="png")


def save_forgotten_before_after(module: Any, data: Any, pretrained: str, classifier_dir: str,
                                steps: int, num: int, path: str, count: int = 24) -> int:
    """The before/after grid of the first ``count`` of the evaluation's ``num`` seeds whose
    original sample the evaluator reads as a forgotten class: what PUL counts, up close.
    Returns how many seeds it shows (0: the original drew none, and no file is written)."""
    original, _ = original_results(module, pretrained, held_out_parts(data), num, steps)
    reading = load_classifier(classifier_dir).predict(original)[0].cpu()
    seeds = torch.isin(reading, torch.tensor(data.forget_classes)).nonzero().flatten()[:count]
    if len(seeds):
        save_before_after(module, classifier_dir, data.forget_classes[0], steps, path,
                          seeds=seeds, num=num)
    return len(seeds)
