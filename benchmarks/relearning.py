"""The relearning attack on every method: steps until half the forgotten class is back.

    python benchmarks/unlearning.py --methods vdu gradient_ascent salun ewc --seeds 0 \
        --workers 2 --export runs/bench/unlearned --out runs/bench/relearn_unlearning.json
    python benchmarks/relearning.py --original runs/mnist5k/ddpm \
        --models vdu=runs/bench/unlearned/vdu_seed0 ga=runs/bench/unlearned/gradient_ascent_seed0 \
        --k 8 32 128 --seeds 0 1 2 --workers 2 --out runs/bench/relearning.json

Each (model, k, seed) is one ``vdu relearn`` in its own process (resumable: a run whose JSON
exists is read, not rerun): the model is fine-tuned with the denoising loss on k training
images of the forgotten class (chosen by the seed), and at the steps ``--at`` the share of
its samples the classifier reads as that class is measured. The original model is attacked
too, as the reference. The table gives, per model and k, the steps until the share reaches
half the original's (mean ± sd over seeds; "> n" when a seed never gets there in n steps).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torchvision.utils import make_grid

from vdu_lightning.diffusion import (
    load_pretrained,
    sample_in_batches,
    sample_shape,
    seeded_noise,
)
from vdu_lightning.evaluation import load_classifier
from vdu_lightning.files import atomic_file, atomic_write_text
from vdu_lightning.relearn import finetune, forget_images


def run(args: argparse.Namespace, name: str, model: str, k: int, seed: int) -> dict[str, Any]:
    out = Path(args.out).with_suffix("") / f"{name}_k{k}_seed{seed}.json"
    if not out.is_file():
        command = [sys.executable, "-m", "vdu_lightning", "relearn", "--model", model,
                   "--original", args.original, "--classifier", args.classifier,
                   "--forget-class", str(args.forget_class), "--k", str(k),
                   "--steps", str(args.steps), "--at", *map(str, args.at),
                   "--lr", str(args.lr), "--num-samples", str(args.num_samples),
                   "--sample-steps", str(args.sample_steps), "--seed", str(seed),
                   "--out", str(out)]
        done = subprocess.run(command, capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        if done.returncode != 0:
            raise RuntimeError(f"{name} k={k} seed {seed} failed:\n{done.stderr[-3000:]}")
        print(done.stdout.strip().splitlines()[-1], flush=True)
    return {"name": name, **json.loads(out.read_text())}


def cell(runs: list[dict[str, Any]], steps: int) -> str:
    recovered = [r["steps_to_recover"] for r in runs]
    if all(s is None for s in recovered):
        return f"> {steps}"
    if any(s is None for s in recovered):
        done = [s for s in recovered if s is not None]
        return f"{'/'.join(map(str, done))}, {recovered.count(None)}× > {steps}"
    spread = statistics.stdev(recovered) if len(recovered) > 1 else 0.0
    return f"{statistics.mean(recovered):.0f} ± {spread:.0f}"


def table(results: list[dict[str, Any]], ks: list[int], steps: int) -> str:
    lines = ["| model | share before (%) | " + " | ".join(
        f"k = {k}: steps to half | k = {k}: share after {steps} (%)" for k in ks) + " |",
        "|---" * (2 + 2 * len(ks)) + "|"]
    for name in dict.fromkeys(r["name"] for r in results):
        mine = [r for r in results if r["name"] == name]
        before = statistics.mean(100 * r["curve"][0]["share"] for r in mine)
        cells = []
        for k in ks:
            at_k = [r for r in mine if r["k"] == k]
            after = [100 * r["curve"][-1]["share"] for r in at_k]
            spread = statistics.stdev(after) if len(after) > 1 else 0.0
            cells += [cell(at_k, steps), f"{statistics.mean(after):.0f} ± {spread:.0f}"]
        lines.append(f"| {name} | {before:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_grid(models: dict[str, str], args: argparse.Namespace, path: str,
              steps: tuple[int, ...] = (0, 2, 5)) -> None:
    """One row per (model, attack steps), k = 8 and seed 0: the first 16 samples, then up to 16
    of those the classifier reads as the forgotten class (black when fewer): what the share
    counts, up close, upscaled twice."""
    from PIL import Image

    def pad(images: torch.Tensor) -> torch.Tensor:  # to 16 images, black
        return torch.cat([images, -torch.ones(16 - len(images), *images.shape[1:])])

    classifier = load_classifier(args.classifier)
    images = forget_images("mnist5k", [args.forget_class], 8, 0, image_size=16)
    rows = []
    for name, model in models.items():
        for n in steps:
            if n:
                module = finetune(model, images, n, args.lr, seed=0)
                unet, config = module.unet, module.scheduler.config
            else:
                unet, scheduler = load_pretrained(model)
                config = scheduler.config
            samples = sample_in_batches(unet.eval(), config, seeded_noise(
                args.num_samples, sample_shape(unet), 0), args.sample_steps)
            read = classifier.predict(samples)[0]
            rows += [pad(samples[:16]), pad(samples[read == args.forget_class][:16])]
            print(f"grid: {name} after {n} steps: {len(samples[read == args.forget_class])} "
                  f"of {args.num_samples} read as {args.forget_class}", flush=True)
    grid = make_grid((torch.cat(rows) + 1) / 2, nrow=32, padding=1)
    picture = Image.fromarray(grid.mul(255).round().byte().permute(1, 2, 0).numpy())
    picture = picture.resize((picture.width * 2, picture.height * 2), Image.NEAREST)
    with atomic_file(path) as tmp:
        picture.save(tmp, format="png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--original", default="runs/mnist5k/ddpm")
    parser.add_argument("--models", nargs="*", default=[],
                        help="name=DIR of each unlearned model")
    parser.add_argument("--classifier", default="runs/mnist5k/classifier")
    parser.add_argument("--forget-class", type=int, default=1)
    parser.add_argument("--k", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--at", type=int, nargs="+", default=[0, 2, 5, 10, 20, 40, 80],
                        help="the steps at which the share is measured")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--num-samples", type=int, default=200)
    parser.add_argument("--sample-steps", type=int, default=10)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--out", default="runs/bench/relearning.json")
    parser.add_argument("--grid", default=None,
                        help="also the picture of each model's samples after 0, 2, 5 steps")
    args = parser.parse_args()
    models = {"original": args.original}
    for item in args.models:
        name, _, path = item.partition("=")
        if not path:
            parser.error(f"--models takes name=DIR, got {item!r}")
        models[name] = path
    jobs = [(name, model, k, seed) for name, model in models.items() for k in args.k
            for seed in args.seeds]
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        results = list(pool.map(lambda job: run(args, *job), jobs))
    if args.grid:
        save_grid(models, args, args.grid)
    report = table(results, args.k, args.steps)
    print(report)
    atomic_write_text(args.out, json.dumps({"settings": vars(args), "runs": results,
                                            "table": report}, indent=1) + "\n")


if __name__ == "__main__":
    main()
