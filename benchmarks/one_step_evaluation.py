"""The one-step generators' evaluation (issue 7): UA, class consistency, u-FID, speed.

The same seeded noises and labels go through the one-step generator and through the
label-conditional teacher's DDIM-50, the teacher's multi-step numbers being the reference:

* UA, unlearning accuracy: 1 − an evaluator's accuracy on the forgotten labels' samples;
* class consistency: its accuracy on the retained labels' samples;
* u-FID of the retained labels' samples against the real retained-class training images, on
  its features (as paired_evaluation.py);
* images per second of each sampler, at one batch size, after a warm-up.

each by both evaluators (the second's keys start with ``second_``). The teacher's samples
are cached beside it (they never change).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch
from torchvision.utils import save_image

from paired_evaluation import evaluators

from vdu_lightning import ForgetSetDataModule
from vdu_lightning.checkpoints import load_diffusion_model
from vdu_lightning.diffusion import sample_in_batches, sample_shape, seeded_noise
from vdu_lightning.evaluation.references import retained_reference
from vdu_lightning.files import atomic_file
from vdu_lightning.metrics import UnlearnedFID
from vdu_lightning.methods.sfd import OneStepGeneratorPipeline, one_step_images


def labels_and_noise(num_per_label: int, num_classes: int, shape: tuple[int, ...]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_per_label`` samples of every label, label-major, with noise from seed 0."""
    labels = torch.arange(num_classes).repeat_interleave(num_per_label)
    return labels, seeded_noise(len(labels), shape, seed=0)


def teacher_samples(teacher: str, labels: torch.Tensor, noise: torch.Tensor, steps: int
                    ) -> torch.Tensor:
    """The teacher's DDIM samples (no guidance), cached beside it (inside a directory)."""
    source = Path(teacher)
    folder, prefix = (source.parent, f".{source.name}") if source.is_file() else (source, "")
    cache = folder / f"{prefix}.bench_one_step_reference_{len(labels)}_{steps}.pt"
    if cache.is_file():
        return torch.load(cache, weights_only=True)
    unet, scheduler, _ = load_diffusion_model(teacher)
    images = sample_in_batches(unet, scheduler.config, noise, steps, labels=labels)
    with atomic_file(cache) as tmp:
        torch.save(images, tmp)
    return images


def images_per_second(sample: Callable[[], Any], batch: int, repeats: int = 3) -> float:
    sample()  # warm-up: first-call allocations and kernel choices
    start = time.perf_counter()
    for _ in range(repeats):
        sample()
    return batch * repeats / (time.perf_counter() - start)


def speeds(generator: OneStepGeneratorPipeline, teacher: str, steps: int, batch: int
           ) -> dict[str, float]:
    unet, scheduler, _ = load_diffusion_model(teacher)
    shape = sample_shape(generator.unet)
    num_classes = generator.unet.config.num_class_embeds - 1  # the last is "no label"
    labels, noise = torch.arange(batch) % num_classes, seeded_noise(batch, shape, seed=1)
    generator.unet.eval()
    with torch.no_grad():
        one_step = images_per_second(lambda: one_step_images(
            generator.unet, generator.scheduler.alphas_cumprod, generator.config.t_init, noise,
            labels), batch)
    multi_step = images_per_second(lambda: sample_in_batches(
        unet, scheduler.config, noise, steps, labels=labels, batch_size=batch), batch, repeats=1)
    return {"one_step_images_per_second": one_step,
            f"ddim{steps}_images_per_second": multi_step, "speedup": one_step / multi_step}


def scores(predicted: torch.Tensor, labels: torch.Tensor, forget: list[int],
           num_classes: int) -> dict[str, Any]:
    forgotten = torch.isin(labels, torch.tensor(forget))
    correct = (predicted == labels).float()
    return {"ua": 100 * (1 - float(correct[forgotten].mean())),
            "class_consistency": 100 * float(correct[~forgotten].mean()),
            # What the forgotten labels draw instead, as the classifier sees it.
            "forgotten_drawn_as": torch.bincount(predicted[forgotten],
                                                 minlength=num_classes).tolist()}


def save_grid(generator_dir: str, path: Path, per_label: int = 8, scale: int = 4) -> None:
    """A PNG of ``per_label`` one-step samples per label, one row each, every row from the
    same noises (seed 0): a column shows what one z becomes under each label. Each sample is
    enlarged ``scale`` times without smoothing (16 pixels are too few to read)."""
    generator = OneStepGeneratorPipeline.from_pretrained(generator_dir)
    num_classes = generator.unet.config.num_class_embeds - 1
    images = torch.cat([generator([label] * per_label, generator=torch.Generator().manual_seed(0),
                                  output_type="pt").images for label in range(num_classes)])
    images = torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest")
    with atomic_file(path) as tmp:
        save_image((images + 1) / 2, tmp, nrow=per_label, padding=4, pad_value=1.0,
                   format="png")


def evaluate_one_step(generator_dir: str, teacher: str, classifier_dirs: list[str],
                      forget: list[int],
                      num_per_label: int, steps: int = 50, speed_batch: int = 100
                      ) -> dict[str, Any]:
    """The generator's and the teacher's UA, class consistency and u-FID, and their speeds."""
    generator = OneStepGeneratorPipeline.from_pretrained(generator_dir)
    unet = generator.unet
    shape = sample_shape(unet)
    num_classes = unet.config.num_class_embeds - 1
    labels, noise = labels_and_noise(num_per_label, num_classes, shape)
    with torch.no_grad():
        one_step = torch.cat([
            one_step_images(unet.eval(), generator.scheduler.alphas_cumprod,
                            generator.config.t_init, z, c).clamp(-1, 1)
            for z, c in zip(noise.split(256), labels.split(256))])
    reference = teacher_samples(teacher, labels, noise, steps)
    nets = evaluators(classifier_dirs)
    real = retained_reference(ForgetSetDataModule(dataset="mnist5k", image_size=shape[-1],
                                                  forget_classes=forget))
    retained = ~torch.isin(labels, torch.tensor(forget))
    results: dict[str, Any] = {"samples_per_label": num_per_label, "real_images": len(real),
                               "evaluators": list(nets)}
    for name, images, sampler, num_steps in (("one_step", one_step, "one_step", 1),
                                             ("teacher", reference, "ddim", steps)):
        results[name] = {}
        for index, net in enumerate(nets.values()):
            prefix = "second_" if index else ""
            fid = UnlearnedFID(classifier=net, sampler=sampler, num_steps=num_steps)
            fid.update(real, real=True)
            fid.update(images[retained], real=False)
            measured = {**scores(net.predict(images)[0], labels, forget, num_classes),
                        "u_fid": float(fid.compute()), "u_fid_name": fid.name}
            results[name].update({prefix + key: value for key, value in measured.items()})
    results["speed"] = speeds(generator, teacher, steps, speed_batch)
    return results
