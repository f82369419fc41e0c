"""Pre-train the mnist5k DDPM and the classifier from the shipped configs, then measure.

Reports the wall time of the trainings, the evaluators' held-out accuracy, and the class
histogram that each evaluator gives to N DDIM samples of the pre-trained model (EMA
weights), and saves a sample grid. Results go to stdout (a markdown table) and to a JSON file.

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

from vdu_lightning import DiffusionModule, ImageDataModule
from vdu_lightning.callbacks.samples import image_grid, save_grid
from vdu_lightning.cli import main as vdu
from vdu_lightning.evaluation import ClassifierNet, load_classifier
from vdu_lightning.files import atomic_write_text

EVALUATORS = {"classifier": "configs/mnist5k/classifier.yaml",
              "classifier_lenet": "configs/mnist5k/classifier_lenet.yaml"}

REPO = Path(__file__).resolve().parents[1]


def timed_fit(config: str, extra: list[str]) -> float:
    start = time.perf_counter()
    vdu(["fit", "--config", str(REPO / config), *extra])
    return time.perf_counter() - start


@torch.no_grad()
def held_out_accuracy(classifier: ClassifierNet, image_size: int) -> float:
    held_out = ImageDataModule(dataset="mnist5k", image_size=image_size).load("val")
    return float((classifier.predict(held_out.images)[0] == held_out.labels).float().mean())


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
        for name, config in EVALUATORS.items():
            times[f"{name}_fit_s"] = timed_fit(config, [])
        times["ddpm_fit_s"] = timed_fit("configs/mnist5k/pretrain.yaml", args.override)

    evaluators = {name: load_classifier(f"runs/mnist5k/{name}") for name in EVALUATORS}
    ddpm = DiffusionModule.from_pretrained("runs/mnist5k/ddpm")
    accuracy = {name: held_out_accuracy(net, ddpm.sample_shape[-1])
                for name, net in evaluators.items()}

    start = time.perf_counter()
    samples = ddpm.sample(args.num_samples, seed=0, num_steps=args.sample_steps, batch_size=250)
    times["sampling_s"] = time.perf_counter() - start
    histograms = {name: torch.bincount(net.predict(samples)[0], minlength=10).tolist()
                  for name, net in evaluators.items()}
    histogram = histograms["classifier"]
    save_grid(image_grid(samples[:100], nrow=10), REPO / args.grid)

    result = {
        "date": date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, "
                   f"{torch.get_num_threads()} threads, torch {torch.__version__}",
        "held_out_accuracy": accuracy,
        "num_samples": args.num_samples,
        "sampler": f"DDIM-{args.sample_steps} (eta=0), EMA weights",
        "histogram": histogram,
        "histograms": histograms,
        "classes_present": sum(count > 0 for count in histogram),
        **{k: round(v, 1) for k, v in times.items()},
    }
    atomic_write_text(args.json, json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print("| digit | " + " | ".join(str(d) for d in range(10)) + " |")
    print("|---" * 11 + "|")
    for name, counts in histograms.items():
        print(f"| {name} | " + " | ".join(str(c) for c in counts) + " |")


if __name__ == "__main__":
    main()
