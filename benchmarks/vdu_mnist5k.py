"""VDU on the foundation's mnist5k DDPM: forget one digit (or several), then PUL and u-FID.

    python benchmarks/vdu_mnist5k.py --prior runs/mnist5k/prior_trajectory.safetensors \
        --gamma 0.9 --max-steps 400 --out runs/bench/trajectory.json

Several digits at once: ``--forget-class 1 7``. One after the other: ``--export`` the first
run's model, start the second from it (``--pretrained``) and compare with the true original
(``--original``); ``--prior-mean start`` centres the prior on the model it starts from (the
first run's result) instead of the original's weights (sequential.py runs both).

Every option of ``VDUModule`` that shapes the forgetting has a flag (the plasticity residual,
the hinge, the timestep band, the preconditioner, which parameters move, the target forget
error); vdu_selectivity.py runs the ablation, classes and seeds through this script.

Needs runs/mnist5k/ddpm (+ the trajectory prior) from configs/mnist5k/pretrain.yaml, the
two evaluators from configs/mnist5k/classifier.yaml and classifier_lenet.yaml and, for a
finetune prior, configs/mnist5k/prior_finetune.yaml. Protocol (docs/method.md §4, as
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

from paired_evaluation import evaluate, save_before_after, save_forgotten_before_after

from vdu_lightning import ForgetSetDataModule, VDUModule
from vdu_lightning.callbacks import CheckpointPrior, UnlearningGuard
from vdu_lightning.checkpoints import load_diffusion_model
from vdu_lightning.files import atomic_write_text


#: --prior-mean → CheckpointPrior's centre.
CENTRES = {"checkpoints": "checkpoints", "start": "model"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained", default="runs/mnist5k/ddpm")
    parser.add_argument("--classifiers", nargs="+",
                        default=["runs/mnist5k/classifier", "runs/mnist5k/classifier_lenet"])
    parser.add_argument("--prior", required=True)
    parser.add_argument("--forget-class", type=int, nargs="+", default=[1])
    parser.add_argument("--original", default=None,
                        help="the model the evaluation compares with (default: --pretrained)")
    parser.add_argument("--prior-mean", default="checkpoints", choices=["checkpoints", "start"],
                        help="the prior's mean: its checkpoints' (the original's), or the "
                             "weights the run starts from, with the same variances")
    parser.add_argument("--export", default=None, help="write the unlearned model here")
    parser.add_argument("--evaluate-classes", type=int, nargs="+", default=None,
                        help="the digits the evaluation counts as forgotten (default: "
                             "--forget-class)")
    parser.add_argument("--seed", type=int, default=0, help="the run's noise and data order")
    parser.add_argument("--gamma", type=float, default=0.9)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--optimizer", default="adam", choices=["adam", "adamw", "sgd"])
    parser.add_argument("--timestep-weighting", default="simple", choices=["simple", "elbo"])
    parser.add_argument("--residual", default="plain", choices=["plain", "centred"])
    parser.add_argument("--hinge-factor", type=float, default=None)
    parser.add_argument("--forget-timesteps", type=int, nargs=2, default=None,
                        metavar=("LO", "HI"))
    parser.add_argument("--preconditioner", default="none", choices=["none", "prior"])
    parser.add_argument("--include", nargs="+", default=None,
                        help="patterns of the parameters that move (the prior kept over them)")
    parser.add_argument("--target-forget-loss", type=float, default=None,
                        help="stop at the first validation (every 20 steps) whose held-out "
                             "forget error reaches this")
    parser.add_argument("--max-steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--sample-steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--grid", default=None,
                        help="also write the captioned before/after grid of the first 32 seeds "
                             "(PNG)")
    parser.add_argument("--grid-forgotten", default=None,
                        help="also the grid of the first 24 seeds whose original is the "
                             "forgotten digit (PNG)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    original = args.original or args.pretrained
    pl.seed_everything(args.seed)
    data = ForgetSetDataModule(dataset="mnist5k", image_size=16, batch_size=args.batch_size,
                               forget_classes=args.forget_class, forget_size=500)
    module = VDUModule(args.pretrained, gamma=args.gamma, lr=args.lr, optimizer=args.optimizer,
                       timestep_weighting=args.timestep_weighting, residual=args.residual,
                       hinge_factor=args.hinge_factor, forget_timesteps=args.forget_timesteps,
                       preconditioner=args.preconditioner,
                       target_forget_loss=args.target_forget_loss)
    # Validation only to stop on the target forget error.
    validation = ({"limit_val_batches": 0} if args.target_forget_loss is None else
                  {"val_check_interval": 20, "check_val_every_n_epoch": None,
                   "num_sanity_val_steps": 0})
    trainer = pl.Trainer(max_steps=args.max_steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[CheckpointPrior(prior=args.prior, include=args.include,
                                                    centre=CENTRES[args.prior_mean]),
                                    UnlearningGuard()], **validation)
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    fit_seconds = time.perf_counter() - start

    if original != args.pretrained:
        # Compare with the model before any unlearning, not with the one this run started from.
        module.frozen.add("original", load_diffusion_model(original)[0])
    start = time.perf_counter()
    evaluated = data if args.evaluate_classes is None else ForgetSetDataModule(
        dataset="mnist5k", image_size=16, batch_size=args.batch_size,
        forget_classes=args.evaluate_classes, forget_size=500)
    if evaluated is not data:
        evaluated.setup("fit")
    scores = evaluate(module, evaluated, original, args.classifiers, args.num_samples,
                      args.sample_steps)
    if args.export:
        module.save_pretrained(args.export)
    evaluation_seconds = time.perf_counter() - start
    if args.grid:
        save_before_after(module, args.classifiers[0], args.forget_class[0], args.sample_steps,
                          args.grid)
    forgotten_seeds = None if not args.grid_forgotten else save_forgotten_before_after(
        module, data, original, args.classifiers[0], args.sample_steps,
        args.num_samples, args.grid_forgotten)
    result = {
        "args": vars(args), "fit_seconds": round(fit_seconds, 1),
        "evaluation_seconds": round(evaluation_seconds, 1), "steps": trainer.global_step,
        "forgotten_grid_seeds": forgotten_seeds,
        **scores, "final_terms": {k: float(v) for k, v in module.loss_terms.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items()
                      if k not in ("args", "paired", "likelihood")}))


if __name__ == "__main__":
    main()
