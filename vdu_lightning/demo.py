"""``vdu demo``: the whole story on mnist5k, from nothing to a report, offline.

    vdu demo                       # forget digit 1, write ./vdu-demo
    vdu demo --forget-class 7 --output out/seven
    vdu demo --quick               # tiny budgets: a minute, for CI and a first look

Stages, each with a progress bar and a one-line summary: (1) pre-train a DDPM on mnist5k
while ``PriorSnapshot`` collects VDU's trajectory prior, (2) train the evaluation classifier,
(3) unlearn the digit with ``VDUModule``, (4) evaluate (PUL, u-FID, class histograms) and
write the report. Stages 1 and 2 are cached under ``--cache-dir`` by their settings, so a
second run starts at stage 3. The full budgets are those of configs/mnist5k/{pretrain,
classifier,vdu}.yaml (a test keeps them in step).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from vdu_lightning.callbacks import (
    CheckpointPrior,
    ExportPretrained,
    PriorSnapshot,
    UnlearningEvaluation,
    UnlearningGuard,
)
from vdu_lightning.data import ForgetSetDataModule, ImageDataModule
from vdu_lightning.files import atomic_write_text
from vdu_lightning.modules import ClassifierModule, DiffusionModule, VDUModule
from vdu_lightning.prior import ParameterPrior

#: The pre-training UNet of configs/mnist5k/pretrain.yaml (1.1 M parameters, 16×16).
MNIST5K_UNET = {
    "sample_size": 16, "in_channels": 1, "out_channels": 1,
    "block_out_channels": [32, 64, 64], "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "norm_num_groups": 8, "attention_head_dim": 16,
}
#: A UNet small enough for a CI run (8×8, no attention).
TINY_UNET = {
    "sample_size": 8, "in_channels": 1, "out_channels": 1, "block_out_channels": [16, 32],
    "layers_per_block": 1, "down_block_types": ["DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D"], "norm_num_groups": 8,
    "add_attention": False,
}


@dataclasses.dataclass(frozen=True)
class Budget:
    """Every setting of a demo run; the pre-training and classifier ones key the cache."""

    name: str
    unet: dict[str, Any]
    image_size: int
    pretrain_steps: int
    pretrain_batch_size: int
    pretrain_lr: float
    warmup_steps: int
    ema_decay: float
    snapshot_every: int
    snapshot_start: int
    classifier_epochs: int
    unlearn_steps: int
    unlearn_batch_size: int
    gamma: float
    lr: float
    forget_size: int
    num_samples: int
    sample_steps: int

    def key(self, stage: str, seed: int) -> str:
        fields = dataclasses.asdict(self)
        names = {"pretrain": ["unet", "image_size", "pretrain_steps", "pretrain_batch_size",
                              "pretrain_lr", "warmup_steps", "ema_decay", "snapshot_every",
                              "snapshot_start"],
                 "classifier": ["image_size", "classifier_epochs"]}[stage]
        text = json.dumps({n: fields[n] for n in names} | {"seed": seed}, sort_keys=True)
        return f"{stage}-{self.name}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


FULL = Budget(
    name="full", unet=MNIST5K_UNET, image_size=16, pretrain_steps=2600, pretrain_batch_size=32,
    pretrain_lr=1e-3, warmup_steps=100, ema_decay=0.995, snapshot_every=100,
    snapshot_start=1300, classifier_epochs=10, unlearn_steps=120, unlearn_batch_size=32,
    gamma=0.97, lr=1e-5, forget_size=500, num_samples=500, sample_steps=25,
)
QUICK = Budget(
    name="quick", unet=TINY_UNET, image_size=8, pretrain_steps=40, pretrain_batch_size=32,
    pretrain_lr=1e-3, warmup_steps=5, ema_decay=0.9, snapshot_every=10, snapshot_start=10,
    classifier_epochs=1, unlearn_steps=10, unlearn_batch_size=16, gamma=0.5, lr=1e-3,
    forget_size=64, num_samples=64, sample_steps=4,
)
_DONE = "done.json"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vdu_lightning" / "demo"


class Demo:
    """One demo run: the stages in order, their summaries, and the files they write."""

    def __init__(self, budget: Budget, forget_class: int, output: Path, cache_dir: Path,
                 accelerator: str = "auto", seed: int = 0) -> None:
        if not 0 <= forget_class <= 9:
            raise ValueError(f"--forget-class must be a digit 0-9, got {forget_class}")
        self.budget, self.forget_class, self.seed = budget, forget_class, seed
        self.output, self.cache_dir, self.accelerator = output, cache_dir, accelerator
        self.summaries: list[str] = []
        self.times: dict[str, float] = {}

    def _trainer(self, callbacks: list[pl.Callback], **kwargs: Any) -> pl.Trainer:
        return pl.Trainer(accelerator=self.accelerator, devices=1, logger=False,
                          enable_checkpointing=False, enable_model_summary=False,
                          callbacks=callbacks, default_root_dir=self.cache_dir, **kwargs)

    def _stage(self, index: int, title: str, run: Callable[[], str]) -> None:
        print(f"[{index}/4] {title} ...", flush=True)
        start = time.perf_counter()
        summary = run()
        self.times[title] = round(time.perf_counter() - start, 1)
        line = f"[{index}/4] {title}: {summary} ({self.times[title]:.0f} s)"
        self.summaries.append(line)
        print(line, flush=True)

    def _cached(self, stage: str) -> tuple[Path, dict[str, Any] | None]:
        folder = self.cache_dir / self.budget.key(stage, self.seed)
        done = folder / _DONE
        return folder, json.loads(done.read_text()) if done.is_file() else None

    # ---- stage 1: the pre-trained DDPM and its trajectory prior ------------------------------
    def pretrain(self) -> str:
        folder, done = self._cached("pretrain")
        self.model_dir, self.prior_path = folder / "ddpm", folder / "prior.safetensors"
        if done is not None:
            self.prior_description = done["prior"]
            return f"cached in {folder} ({done['prior']})"
        b = self.budget
        pl.seed_everything(self.seed, verbose=False)
        module = DiffusionModule(unet=dict(b.unet), lr=b.pretrain_lr, warmup_steps=b.warmup_steps,
                                 ema_decay=b.ema_decay, sample_steps=b.sample_steps)
        data = ImageDataModule(dataset="mnist5k", image_size=b.image_size,
                               batch_size=b.pretrain_batch_size)
        snapshot = PriorSnapshot(path=str(self.prior_path), every_n_steps=b.snapshot_every,
                                 start_step=b.snapshot_start)
        trainer = self._trainer([snapshot, ExportPretrained(str(self.model_dir))],
                                max_steps=b.pretrain_steps, limit_val_batches=0)
        trainer.fit(module, datamodule=data)
        self.prior_description = ParameterPrior.load(self.prior_path).describe()
        atomic_write_text(folder / _DONE, json.dumps({"prior": self.prior_description}))
        return f"{b.pretrain_steps} steps, exported to {self.model_dir}; {self.prior_description}"

    # ---- stage 2: the evaluation classifier ---------------------------------------------------
    def classifier(self) -> str:
        folder, done = self._cached("classifier")
        self.classifier_dir = folder / "classifier"
        if done is not None:
            return f"cached in {folder} (held-out accuracy {done['accuracy']:.1%})"
        b = self.budget
        pl.seed_everything(self.seed, verbose=False)
        module = ClassifierModule(in_channels=1, num_classes=10, width=32, lr=2e-3, max_shift=2)
        data = ImageDataModule(dataset="mnist5k", image_size=b.image_size, batch_size=128)
        trainer = self._trainer([ExportPretrained(str(self.classifier_dir))],
                                max_epochs=b.classifier_epochs)
        trainer.fit(module, datamodule=data)
        accuracy = float(trainer.callback_metrics["val/acc"])
        atomic_write_text(folder / _DONE, json.dumps({"accuracy": accuracy}))
        return f"held-out accuracy {accuracy:.1%}, exported to {self.classifier_dir}"

    # ---- stage 3: VDU -------------------------------------------------------------------------
    def unlearn(self) -> str:
        b = self.budget
        pl.seed_everything(self.seed, verbose=False)
        self.data = ForgetSetDataModule(dataset="mnist5k", image_size=b.image_size,
                                        forget_classes=[self.forget_class],
                                        forget_size=b.forget_size,
                                        batch_size=b.unlearn_batch_size)
        self.module = VDUModule(str(self.model_dir), gamma=b.gamma, lr=b.lr,
                                sample_steps=b.sample_steps)
        trainer = self._trainer([CheckpointPrior(prior=str(self.prior_path)), UnlearningGuard()],
                                max_steps=b.unlearn_steps, limit_val_batches=0)
        trainer.fit(self.module, datamodule=self.data)
        terms = {k: float(v) for k, v in self.module.loss_terms.items()}
        return (f"{b.unlearn_steps} steps on {len(self.data.forget_set)} images of digit "
                f"{self.forget_class}; last stability {terms['stability']:.3g}, "
                f"plasticity {terms['plasticity']:.3g}")

    # ---- stage 4: evaluation and the report --------------------------------------------------
    def evaluate(self) -> str:
        b = self.budget
        self.output.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.output, prefix=".evaluation-") as scratch:
            evaluation = UnlearningEvaluation(
                classifier=str(self.classifier_dir), num_samples=b.num_samples, seed=self.seed,
                num_steps=b.sample_steps, batch_size=250, grid_images=32, dirpath=scratch)
            self._trainer([evaluation]).validate(self.module, datamodule=self.data,
                                                 verbose=False)
            self.results = evaluation.results
            for pattern, name in (("samples_step_*.png", "before_after.png"),
                                  ("histogram_step_*.png", "histogram.png")):
                os.replace(next(Path(scratch).glob(pattern)), self.output / name)
        self.module.save_pretrained(self.output / "model")
        metrics = self.results["metrics"]
        return (f"PUL {metrics['pul']:.1f}%, u-FID {metrics[self.results['fid_name']]:.2f} "
                f"(original {metrics['original/' + self.results['fid_name']]:.2f})")

    def run(self) -> dict[str, Any]:
        start = time.perf_counter()
        self._stage(1, "pre-train the DDPM and collect the prior", self.pretrain)
        self._stage(2, "train the evaluation classifier", self.classifier)
        self._stage(3, f"unlearn digit {self.forget_class} with VDU", self.unlearn)
        self._stage(4, "evaluate and write the report", self.evaluate)
        report = {
            "forget_class": self.forget_class, "budget": dataclasses.asdict(self.budget),
            "seed": self.seed, "evaluation": self.results, "stage_seconds": self.times,
            "total_seconds": round(time.perf_counter() - start, 1),
            "prior": self.prior_description,
        }
        atomic_write_text(self.output / "metrics.json", json.dumps(report, indent=2))
        atomic_write_text(self.output / "report.md", render_report(report, self.summaries))
        print(f"report: {self.output / 'report.md'} ({report['total_seconds']:.0f} s in all)")
        return report


def render_report(report: dict[str, Any], summaries: list[str]) -> str:
    """The Markdown report of a demo run."""
    evaluation, budget = report["evaluation"], report["budget"]
    metrics, fid = evaluation["metrics"], evaluation["fid_name"]
    forget = report["forget_class"]
    hist = evaluation["histograms"]
    rows = "\n".join(f"| {c} | {o} | {u} |" for c, (o, u) in
                     enumerate(zip(hist["original"], hist["unlearned"])))
    pul = (f"{metrics['pul']:.1f}%" if metrics["pul"] == metrics["pul"] else
           f"undefined: the original model generated no digit {forget}")
    fractions = (f"{metrics['forget_fraction_original']:.1%} → "
                 f"{metrics['forget_fraction_unlearned']:.1%}")
    return f"""# VDU demo: forgetting digit {forget} of mnist5k

What was done (budget `{budget['name']}`, seed {report['seed']}):

{chr(10).join('- ' + line for line in summaries)}

The model is a DDPM pre-trained on mnist5k ({budget['image_size']}×{budget['image_size']}).
VDU's {report['prior']}. VDU minimised γ·S + (1−γ)·P with γ = {budget['gamma']},
lr {budget['lr']}, {budget['unlearn_steps']} steps on at most {budget['forget_size']} images of
digit {forget}, and nothing else (no retain data).

## Metrics

{evaluation['num_samples']} samples per model, the same noise for both ({evaluation['sampler']},
{evaluation['num_steps']} steps); the classifier labels them.

| metric | value |
|---|---|
| PUL (share of digit-{forget} samples removed) | {pul} |
| digit {forget} among the samples, original → unlearned | {fractions} |
| u-FID of the unlearned model (`{fid}`) | {metrics[fid]:.2f} |
| the same FID for the original model | {metrics['original/' + fid]:.2f} |
| ratio unlearned / original | {metrics['u_fid_ratio']:.2f} |

u-FID compares samples with the real images of the retained digits, on the features of
`{evaluation['features']}`; lower is better, and the ratio says what unlearning cost.

## Pictures

The same seeds through the original (left) and the unlearned model (right):

![before and after](before_after.png)

Class histogram of the samples:

![class histogram](histogram.png)

| class | original | unlearned |
|---|---|---|
{rows}

## The unlearned model

`model/` is a diffusers directory:

```python
from diffusers import DDIMPipeline
pipeline = DDIMPipeline.from_pretrained("model", local_files_only=True)
images = pipeline(batch_size=16, num_inference_steps=50).images
```

Total time: {report['total_seconds']:.0f} s (stages: {report['stage_seconds']}).
"""


def demo_command(args: list[str]) -> None:
    """``vdu demo``: parse the options and run the demo."""
    parser = argparse.ArgumentParser(
        prog="vdu demo",
        description="Pre-train a DDPM on mnist5k (collecting the VDU prior), train the "
                    "evaluation classifier, unlearn one digit with VDU, evaluate, and write a "
                    "report. Offline; the first two stages are cached.")
    parser.add_argument("--forget-class", type=int, default=1, help="the digit to forget")
    parser.add_argument("--output", default="vdu-demo", help="where the report goes")
    parser.add_argument("--quick", action="store_true",
                        help="tiny budgets (about a minute; for CI and a first look)")
    parser.add_argument("--accelerator", default="auto", help="cpu, gpu, auto, ...")
    parser.add_argument("--cache-dir", default=None,
                        help=f"cache of stages 1-2 (default {default_cache_dir()})")
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args(args)
    output = Path(options.output)
    if output.exists() and not output.is_dir():
        parser.exit(2, f"vdu demo: error: --output {output} exists and is not a directory\n")
    try:
        demo = Demo(QUICK if options.quick else FULL, options.forget_class, output,
                    Path(options.cache_dir) if options.cache_dir else default_cache_dir(),
                    options.accelerator, options.seed)
    except ValueError as err:
        parser.exit(2, f"vdu demo: error: {err}\n")
    demo.run()


__all__ = ["FULL", "QUICK", "Budget", "Demo", "demo_command", "render_report"]
