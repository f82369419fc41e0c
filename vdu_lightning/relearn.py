"""``vdu relearn``: does forgetting survive a relearning attack?

A model that merely hides a class relearns it in a few steps. The attack fine-tunes the
(unlearned) model with the plain denoising loss on ``k`` images of the forgotten class and
tracks, at chosen steps (``--at``, or every ``--every``), the share of its samples (fixed
seeds, DDIM) that the evaluation classifier reads as a forgotten class. The number to report
is the steps until that share is back to half the original model's (``steps_to_recover``).

    vdu relearn --model runs/vdu_forget1 --original runs/mnist5k/ddpm \
        --classifier runs/mnist5k/classifier --forget-class 1 --k 8 --steps 200 --out r.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, RandomSampler
from typing_extensions import override

from vdu_lightning.data.registry import load_dataset
from vdu_lightning.diffusion import (
    load_pretrained,
    sample_in_batches,
    sample_shape,
    seeded_noise,
)
from vdu_lightning.evaluation.classifier import ClassifierNet, load_classifier
from vdu_lightning.files import atomic_write_text, check_file_writable
from vdu_lightning.modules.diffusion import DiffusionModule


def forgotten_share(unet: torch.nn.Module, scheduler_config: Any, classifier: ClassifierNet,
                    forget_classes: Sequence[int], num_samples: int, sample_steps: int,
                    seed: int = 0) -> float:
    """The share of ``num_samples`` DDIM samples (noise seeded by ``seed``) that
    ``classifier`` reads as one of ``forget_classes``."""
    device = next(unet.parameters()).device
    noise = seeded_noise(num_samples, sample_shape(unet), seed, device)
    was_training = unet.training
    images = sample_in_batches(unet.eval(), scheduler_config, noise, sample_steps)
    unet.train(was_training)
    predicted = classifier.to(device).predict(images)[0]
    return float(torch.isin(predicted, torch.tensor(list(forget_classes))).float().mean())


class RelearningProbe(pl.Callback):
    """At the optimizer steps ``at`` (0: before the first), the share of the raw network's
    samples that are a forgotten class (``forgotten_share``), in ``curve``."""

    def __init__(self, classifier: ClassifierNet, forget_classes: Sequence[int],
                 at: Sequence[int], num_samples: int, sample_steps: int) -> None:
        self.classifier, self.forget_classes, self.at = classifier, forget_classes, set(at)
        self.num_samples, self.sample_steps = num_samples, sample_steps
        self.curve: list[dict[str, float]] = []

    def _probe(self, trainer: pl.Trainer, module: DiffusionModule) -> None:
        share = forgotten_share(module.unet, module.scheduler.config, self.classifier,
                                self.forget_classes, self.num_samples, self.sample_steps)
        self.curve.append({"step": trainer.global_step, "share": share})

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if 0 in self.at:
            self._probe(trainer, pl_module)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           *args: Any) -> None:
        if trainer.global_step in self.at:
            self._probe(trainer, pl_module)


def probe_steps(steps: int, every: int, at: Sequence[int] | None = None) -> list[int]:
    """The steps to probe: ``at`` (within 0..steps) if given, else 0, every, 2·every, …, and
    always the last step.

    Example:
        >>> probe_steps(50, 20), probe_steps(50, 20, [0, 2, 5, 99])
        ([0, 20, 40, 50], [0, 2, 5, 50])
    """
    chosen = {s for s in at if 0 <= s <= steps} if at else set(range(0, steps + 1, every))
    return sorted(chosen | {steps})


def steps_to_recover(curve: Sequence[dict[str, float]], target: float) -> int | None:
    """The first probed step whose share reaches ``target`` (None: never within the run).

    Example:
        >>> steps_to_recover([{"step": 0, "share": 0.0}, {"step": 10, "share": 0.06}], 0.05)
        10
    """
    return next((int(p["step"]) for p in curve if p["share"] >= target), None)


def forget_images(dataset: str, forget_classes: Sequence[int], k: int, seed: int,
                  root: str | None = None, image_size: int | None = None) -> torch.Tensor:
    """``k`` training images of ``forget_classes`` (at ``image_size``), chosen by ``seed``."""
    data = load_dataset(dataset, root=root, image_size=image_size, split="train")
    pool = torch.nonzero(torch.isin(data.labels, torch.tensor(list(forget_classes)))).flatten()
    if len(pool) < k:
        raise ValueError(f"{dataset} has {len(pool)} training images of classes "
                         f"{list(forget_classes)}, fewer than k={k}")
    pick = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:k]]
    return data.images[pick]


def finetune(model: str, images: torch.Tensor, steps: int, lr: float = 1e-4,
             batch_size: int = 8, seed: int = 0, accelerator: str = "auto",
             callbacks: Sequence[pl.Callback] = ()) -> DiffusionModule:
    """The diffusers directory ``model`` fine-tuned on ``images`` for ``steps`` steps (AdamW,
    constant ``lr``, the denoising loss, batches drawn with replacement): the attack."""
    pl.seed_everything(seed, verbose=False)
    module = DiffusionModule.from_pretrained(model, lr=lr)
    items = [{"image": image, "label": 0} for image in images]
    sampler = RandomSampler(items, replacement=True, num_samples=steps * batch_size,
                            generator=torch.Generator().manual_seed(seed))
    loader = DataLoader(items, batch_size=batch_size, sampler=sampler)
    pl.Trainer(accelerator=accelerator, devices=1, max_steps=steps, logger=False,
               enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, callbacks=list(callbacks)).fit(module, loader)
    return module


def relearn(model: str, images: torch.Tensor, classifier: ClassifierNet,
            forget_classes: Sequence[int], steps: int, at: Sequence[int], lr: float = 1e-4,
            batch_size: int = 8, num_samples: int = 200, sample_steps: int = 10,
            seed: int = 0, accelerator: str = "auto") -> list[dict[str, float]]:
    """``finetune`` with a ``RelearningProbe`` at the steps ``at``; its curve."""
    probe = RelearningProbe(classifier, forget_classes, at, num_samples, sample_steps)
    finetune(model, images, steps, lr, batch_size, seed, accelerator, [probe])
    return probe.curve


def relearn_command(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="vdu relearn", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the (unlearned) diffusers directory")
    parser.add_argument("--original", default=None,
                        help="the model before unlearning: its share sets the 50%% target")
    parser.add_argument("--classifier", required=True, help="a ClassifierModule directory")
    parser.add_argument("--dataset", default="mnist5k")
    parser.add_argument("--root", default=None)
    parser.add_argument("--forget-class", type=int, nargs="+", required=True)
    parser.add_argument("--k", type=int, default=8, help="forget images the attacker holds")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--at", type=int, nargs="+", default=None,
                        help="probe at these steps instead (e.g. 0 2 5 10 20 40 80)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-samples", type=int, default=200)
    parser.add_argument("--sample-steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    for name in ("k", "steps", "every", "batch_size", "num_samples", "sample_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    try:
        check_file_writable(args.out)
        classifier = load_classifier(args.classifier)
        # The attacker's images at the size the model draws.
        size = load_pretrained(args.model)[0].config.sample_size
        images = forget_images(args.dataset, args.forget_class, args.k, args.seed, args.root,
                               size)
        target = None
        if args.original is not None:
            unet, scheduler = load_pretrained(args.original)
            original = forgotten_share(unet, scheduler.config, classifier, args.forget_class,
                                       args.num_samples, args.sample_steps)
            if original == 0:
                raise ValueError(f"the original model {args.original} draws no image of "
                                 f"classes {args.forget_class} in {args.num_samples} samples: "
                                 "nothing to recover; raise --num-samples")
            target = original / 2
        curve = relearn(args.model, images, classifier, args.forget_class, args.steps,
                        probe_steps(args.steps, args.every, args.at), args.lr,
                        args.batch_size, args.num_samples, args.sample_steps, args.seed,
                        args.accelerator)
    except (OSError, ValueError) as err:
        parser.exit(2, f"vdu relearn: error: {err}\n")
    result = {"model": args.model, "original": args.original, "forget_classes": args.forget_class,
              "k": args.k, "seed": args.seed, "lr": args.lr, "batch_size": args.batch_size,
              "num_samples": args.num_samples, "sample_steps": args.sample_steps,
              "original_share": None if target is None else 2 * target, "curve": curve,
              "steps_to_recover": None if target is None else steps_to_recover(curve, target)}
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    shown = "" if target is None else f"; half the original's share ({target:.3f}) reached " \
        f"at step {result['steps_to_recover']}"
    print(f"wrote {args.out}: share {curve[0]['share']:.3f} -> {curve[-1]['share']:.3f} "
          f"over {args.steps} steps{shown}")
