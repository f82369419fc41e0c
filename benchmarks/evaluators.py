"""The evaluators' robustness and the evaluation's controls, on real held-out mnist5k digits.

    vdu fit --config configs/mnist5k/classifier.yaml
    vdu fit --config configs/mnist5k/classifier_lenet.yaml
    python benchmarks/evaluators.py --classifiers runs/mnist5k/classifier \
        runs/mnist5k/classifier_lenet --out runs/bench/evaluators.json

(1) Each classifier's accuracy on the 500 held-out digits (50 per class, never trained on)
under the perturbations of ``evaluation.photometric.PERTURBATIONS`` (offsets ±0.1 and ±0.2,
contrast ×0.8 and ×1.2, Gaussian noise σ = 0.1, a 3×3 box blur; all clipped to [−1, 1]),
and the share of labels each perturbation changes. The target is ≥ 97% under each.

(2) The controls of ``evaluation.controls`` through ``PairedEvaluation`` (the comparison the
callback, the demo and the benchmarks use), with the held-out digits standing for the
original model's samples: identity, a +0.075 haze, and a perfect forgetter (every digit of
``--forget-class`` replaced by a real retained-class training image). u-FID's reference is
the real retained-class training images.

``--train-ablation`` also trains, in this process, the classifier recipe without input
standardisation or photometric augmentation (the recipe the evaluation used before), to
show what the same measurements and controls say of it.
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import date
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from vdu_lightning import ClassifierModule, ImageDataModule
from vdu_lightning.evaluation import (
    ClassifierNet,
    PairedEvaluation,
    haze_control,
    load_classifier,
    perfect_forgetter_control,
)
from vdu_lightning.evaluation.photometric import PERTURBATIONS
from vdu_lightning.files import atomic_write_text

TARGET = 97.0


def held_out(image_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out digits of mnist5k's split (never trained on by the classifiers)."""
    data = ImageDataModule(dataset="mnist5k", image_size=image_size)
    part = data.load("val")
    return part.images, part.labels


def retained_training_images(forget: int, image_size: int = 16) -> torch.Tensor:
    train = ImageDataModule(dataset="mnist5k", image_size=image_size).load("train")
    return train.images[train.labels != forget]


def robustness(net: ClassifierNet, images: torch.Tensor, labels: torch.Tensor
               ) -> dict[str, dict[str, float]]:
    clean = net.predict(images)[0]
    rows = {}
    for name, perturb in PERTURBATIONS.items():
        predicted = net.predict(perturb(images, torch.Generator().manual_seed(0)))[0]
        rows[name] = {"accuracy": 100 * float((predicted == labels).float().mean()),
                      "labels_changed": 100 * float((predicted != clean).float().mean())}
    return rows


def controls(nets: dict[str, ClassifierNet], images: torch.Tensor, retained: torch.Tensor,
             forget: int) -> dict[str, Any]:
    """The three controls, with ``images`` (real, held out) standing for the original's
    samples and ``retained`` (real, of the other classes) as u-FID's reference and the
    perfect forgetter's replacements."""
    paired = PairedEvaluation(nets, [forget], retained, sampler="real", num_steps=1)
    primary = next(iter(nets.values()))
    sets = {
        "identity": images,
        "haze +0.075": haze_control(images),
        "perfect forgetter": perfect_forgetter_control(images, primary.predict(images)[0],
                                                       [forget], retained),
    }
    return {name: paired.compare(images, unlearned) for name, unlearned in sets.items()}


def train_ablation(image_size: int) -> ClassifierNet:
    """The earlier recipe: no input standardisation, translation only."""
    pl.seed_everything(0, verbose=False)
    module = ClassifierModule(normalise=False, augment=False)
    trainer = pl.Trainer(max_epochs=10, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=ImageDataModule(dataset="mnist5k", image_size=image_size,
                                                   batch_size=128))
    return module.net.eval()


def markdown(results: dict[str, Any]) -> str:
    names = list(results["robustness"])
    columns = " | ".join(f"{n}: accuracy % (labels changed %)" for n in names)
    lines = [f"| perturbation | {columns} |",
             "|---" * (len(names) + 1) + "|"]
    for perturbation in PERTURBATIONS:
        cells = [f"{results['robustness'][n][perturbation]['accuracy']:.1f} "
                 f"({results['robustness'][n][perturbation]['labels_changed']:.1f})"
                 for n in names]
        lines.append(f"| {perturbation} | " + " | ".join(cells) + " |")
    lines += ["", "| control | evaluator | PUL % | u-FID ratio | retained drift |",
              "|---|---|---|---|---|"]
    for control, result in results["controls"].items():
        for name, scores in result["evaluators"].items():
            lines.append(f"| {control} | {name} | {scores['pul']:.1f} | "
                         f"{scores['u_fid_ratio']:.3f} | {scores['retained_drift']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classifiers", nargs="+",
                        default=["runs/mnist5k/classifier", "runs/mnist5k/classifier_lenet"])
    parser.add_argument("--forget-class", type=int, default=1)
    parser.add_argument("--train-ablation", action="store_true")
    parser.add_argument("--out", default="runs/bench/evaluators.json")
    args = parser.parse_args()

    images, labels = held_out()
    nets = {Path(path).name: load_classifier(path) for path in args.classifiers}
    if args.train_ablation:
        nets["ablation (no standardisation, no augmentation)"] = train_ablation(
            images.shape[-1])
    robust = {name: robustness(net, images, labels) for name, net in nets.items()}
    results = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, "
                   f"torch {torch.__version__}",
        "held_out_images": len(images), "target_accuracy": TARGET,
        "robustness": robust,
        "meets_target": {name: min(r["accuracy"] for r in rows.values()) >= TARGET
                         for name, rows in robust.items()},
        "controls": controls(nets, images, retained_training_images(args.forget_class),
                             args.forget_class),
    }
    results["table"] = markdown(results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(results, indent=2))
    print(results["table"])
    print(json.dumps(results["meets_target"]))


if __name__ == "__main__":
    main()
