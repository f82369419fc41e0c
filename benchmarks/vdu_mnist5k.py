"""VDU on the foundation's mnist5k DDPM: forget one digit, then PUL and u-FID.

    python benchmarks/vdu_mnist5k.py --prior runs/mnist5k/prior_trajectory.safetensors \
        --gamma 0.9 --max-steps 400 --out runs/bench/trajectory.json

Needs runs/mnist5k/ddpm (+ the trajectory prior) from configs/mnist5k/pretrain.yaml, the
two evaluators from configs/mnist5k/classifier.yaml and classifier_lenet.yaml and, for a
finetune prior, configs/mnist5k/prior_finetune.yaml. Protocol (method.md §4, as
paired_evaluation.py): N samples with the same seeds from the original and the unlearned
model; each evaluator counts the forgotten digit (PUL) and gives u-FID's features against the
real retained-class training images; the classifier-free measures beside them; the
original's samples and bound are cached per model directory.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from paired_evaluation import evaluate, save_before_after

from vdu_lightning import ForgetSetDataModule, VDUModule
from vdu_lightning.callbacks import CheckpointPrior, UnlearningGuard
from vdu_lightning.files import atomic_write_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained", default="runs/mnist5k/ddpm")
    parser.add_argument("--classifiers", nargs="+",
                        default=["runs/mnist5k/classifier", "runs/mnist5k/classifier_lenet"])
    parser.add_argument("--prior", required=True)
    parser.add_argument("--forget-class", type=int, default=1)
    parser.add_argument("--gamma", type=float, default=0.9)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--optimizer", default="adam", choices=["adam", "adamw", "sgd"])
    parser.add_argument("--timestep-weighting", default="simple", choices=["simple", "elbo"])
    parser.add_argument("--max-steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--sample-steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--grid", default=None,
                        help="also write the captioned before/after grid of the first 32 seeds "
                             "(PNG)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    pl.seed_everything(0)
    data = ForgetSetDataModule(dataset="mnist5k", image_size=16, batch_size=args.batch_size,
                               forget_classes=[args.forget_class], forget_size=500)
    module = VDUModule(args.pretrained, gamma=args.gamma, lr=args.lr, optimizer=args.optimizer,
                       timestep_weighting=args.timestep_weighting)
    trainer = pl.Trainer(max_steps=args.max_steps, logger=False, enable_checkpointing=False,
                         limit_val_batches=0, enable_progress_bar=False,
                         enable_model_summary=False,
                         callbacks=[CheckpointPrior(prior=args.prior), UnlearningGuard()])
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    fit_seconds = time.perf_counter() - start

    start = time.perf_counter()
    scores = evaluate(module, data, args.pretrained, args.classifiers, args.num_samples,
                      args.sample_steps)
    evaluation_seconds = time.perf_counter() - start
    if args.grid:
        save_before_after(module, args.classifiers[0], args.forget_class, args.sample_steps,
                          args.grid)
    result = {
        "args": vars(args), "fit_seconds": round(fit_seconds, 1),
        "evaluation_seconds": round(evaluation_seconds, 1), "steps": trainer.global_step,
        **scores, "final_terms": {k: float(v) for k, v in module.loss_terms.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items()
                      if k not in ("args", "paired", "likelihood")}))


if __name__ == "__main__":
    main()
