"""Pre-train the mnist5k DDPM and the classifier from the shipped configs, then measure.

Reports the wall time of both trainings, the classifier's held-out accuracy, and the class
histogram that the classifier gives to N DDIM samples of the pre-trained model (EMA weights),
and saves a sample grid. Results go to stdout (a markdown table) and to a JSON file.

    python benchmarks/foundation.py                      # train both, then evaluate
    python benchmarks/foundation.py --skip-training      # evaluate runs/mnist5k/* as they are
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import torch

from vdu_lightning import ClassifierModule, DiffusionModule, ImageDataModule
from vdu_lightning.callbacks.samples import image_grid, save_grid
from vdu_lightning.cli import main as vdu
from vdu_lightning.files import atomic_write_text

REPO = Path(__file__).resolve().parents[1]


def timed_fit(config: str, extra: list[str]) -> float:
    start = time.perf_counter()
    vdu(["fit", "--config", str(REPO / config), *extra])
    return time.perf_counter() - start


@torch.no_grad()
def held_out_accuracy(classifier: ClassifierModule, image_size: int) -> float:
    data = ImageDataModule(dataset="mnist5k", image_size=image_size, batch_size=500)
    data.setup("fit")
    correct = total = 0
    for batch in data.val_dataloader():
        correct += (classifier.predict_labels(batch["image"]) == batch["label"]).sum().item()
        total += len(batch["label"])
    return correct / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--sample-steps", type=int, default=50)
    parser.add_argument("--grid", default="docs/images/mnist5k_ddpm_samples.png")
    parser.add_argument("--json", default="runs/mnist5k/foundation.json")
    parser.add_argument("--override", action="append", default=[],
                        help="extra CLI arguments for the DDPM fit, e.g. --trainer.max_steps=100")
    args = parser.parse_args()

    times = {}
    if not args.skip_training:
        times["classifier_fit_s"] = timed_fit("configs/mnist5k/classifier.yaml", [])
        times["ddpm_fit_s"] = timed_fit("configs/mnist5k/pretrain.yaml", args.override)

    classifier = ClassifierModule.from_pretrained("runs/mnist5k/classifier")
    ddpm = DiffusionModule.from_pretrained("runs/mnist5k/ddpm")
    accuracy = held_out_accuracy(classifier, ddpm.sample_shape[-1])

    start = time.perf_counter()
    samples = ddpm.sample(args.num_samples, seed=0, num_steps=args.sample_steps, batch_size=250)
    times["sampling_s"] = time.perf_counter() - start
    labels = torch.cat([classifier.predict_labels(chunk) for chunk in samples.split(500)])
    histogram = torch.bincount(labels, minlength=10).tolist()
    save_grid(image_grid(samples[:100], nrow=10), REPO / args.grid)

    result = {
        "date": date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, "
                   f"{torch.get_num_threads()} threads, torch {torch.__version__}",
        "classifier_val_accuracy": accuracy,
        "num_samples": args.num_samples,
        "sampler": f"DDIM-{args.sample_steps} (eta=0), EMA weights",
        "histogram": histogram,
        "classes_present": sum(count > 0 for count in histogram),
        **{k: round(v, 1) for k, v in times.items()},
    }
    atomic_write_text(args.json, json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print("| digit | " + " | ".join(str(d) for d in range(10)) + " |")
    print("|---" * 11 + "|")
    print("| samples | " + " | ".join(str(c) for c in histogram) + " |")


if __name__ == "__main__":
    main()
