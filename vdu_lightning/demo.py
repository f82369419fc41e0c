"""``vdu demo``: the whole story on mnist5k, from nothing to a report, offline.

    vdu demo                       # forget digit 1, write ./vdu-demo
    vdu demo --forget-class 7 --output out/seven
    vdu demo --quick               # tiny budgets: a minute, for CI and a first look

Stages, each with a progress bar and a one-line summary: (1) pre-train a DDPM on mnist5k
while ``PriorSnapshot`` collects VDU's trajectory prior, (2) train the two evaluation
classifiers, (3) unlearn the digit with ``VDUModule``, (4) evaluate (PUL and u-FID by both
evaluators, the measures that need no classifier, class histograms, a captioned grid) and
write the report. Stages 1 and 2 are cached under ``--cache-dir`` by their settings, and so
are the original model's samples, so a second run starts at stage 3. The full budgets are
those of configs/mnist5k/{pretrain,classifier,classifier_lenet,vdu}.yaml (a test keeps them
in step).
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
from vdu_lightning.callbacks.evaluation import json_plain
from vdu_lightning.files import atomic_write_text
from vdu_lightning.model_card import describe_forget_set
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
    second_classifier_epochs: int
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
                 "classifier": ["image_size", "classifier_epochs",
                                "second_classifier_epochs"]}[stage]
        text = json.dumps({n: fields[n] for n in names} | {"seed": seed}, sort_keys=True)
        return f"{stage}-{self.name}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


FULL = Budget(
    name="full", unet=MNIST5K_UNET, image_size=16, pretrain_steps=2600, pretrain_batch_size=32,
    pretrain_lr=1e-3, warmup_steps=100, ema_decay=0.995, snapshot_every=100,
    snapshot_start=1300, classifier_epochs=10, second_classifier_epochs=25,
    unlearn_steps=120, unlearn_batch_size=32,
    gamma=0.97, lr=1e-5, forget_size=500, num_samples=500, sample_steps=25,
)
QUICK = Budget(
    name="quick", unet=TINY_UNET, image_size=8, pretrain_steps=40, pretrain_batch_size=32,
    pretrain_lr=1e-3, warmup_steps=5, ema_decay=0.9, snapshot_every=10, snapshot_start=10,
    classifier_epochs=1, second_classifier_epochs=1, unlearn_steps=10, unlearn_batch_size=16,
    gamma=0.5, lr=1e-3, forget_size=64, num_samples=64, sample_steps=4,
)
_DONE = "done.json"
#: The evaluators of configs/mnist5k/classifier{,_lenet}.yaml: (architecture, seed, lr).
EVALUATORS = {"classifier": ("vgg", 0, 2e-3), "second_classifier": ("lenet", 1, 3e-3)}


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

    # ---- stage 2: the two evaluation classifiers ----------------------------------------------
    def classifier(self) -> str:
        folder, done = self._cached("classifier")
        self.classifier_dirs = {name: folder / name for name in EVALUATORS}
        if done is not None:
            return f"cached in {folder} (held-out accuracy {self._accuracies(done)})"
        b = self.budget
        epochs = {"classifier": b.classifier_epochs,
                  "second_classifier": b.second_classifier_epochs}
        accuracies = {}
        for name, (architecture, seed, lr) in EVALUATORS.items():
            pl.seed_everything(seed, verbose=False)
            module = ClassifierModule(in_channels=1, num_classes=10, width=32, lr=lr,
                                      architecture=architecture)
            data = ImageDataModule(dataset="mnist5k", image_size=b.image_size, batch_size=128)
            trainer = self._trainer([ExportPretrained(str(self.classifier_dirs[name]))],
                                    max_epochs=epochs[name])
            trainer.fit(module, datamodule=data)
            accuracies[name] = float(trainer.callback_metrics["val/acc"])
        atomic_write_text(folder / _DONE, json.dumps({"accuracy": accuracies}))
        return (f"held-out accuracy {self._accuracies({'accuracy': accuracies})}, exported to "
                f"{folder}")

    @staticmethod
    def _accuracies(done: dict[str, Any]) -> str:
        return ", ".join(f"{value:.1%} ({EVALUATORS[name][0]})"
                         for name, value in done["accuracy"].items())

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
                classifier=str(self.classifier_dirs["classifier"]),
                second_classifier=str(self.classifier_dirs["second_classifier"]),
                num_samples=b.num_samples, seed=self.seed, num_steps=b.sample_steps,
                batch_size=250, grid_images=32, cache_dir=str(self.cache_dir / "evaluation"),
                dirpath=scratch)
            self._trainer([evaluation]).validate(self.module, datamodule=self.data,
                                                 verbose=False)
            self.results = evaluation.results
            for pattern, name in (("samples_step_*.png", "before_after.png"),
                                  ("histogram_step_*.png", "histogram.png")):
                os.replace(next(Path(scratch).glob(pattern)), self.output / name)
        # The exported model carries its card: the forget set, this evaluation, the grid.
        self.module.save_pretrained(self.output / "model", card=self.module.model_card(
            forget_set=describe_forget_set(self.data), evaluation=json_plain(self.results),
            picture=self.output / "before_after.png", where="model"))
        metrics = self.results["metrics"]
        second = metrics.get("second_classifier/pul", float("nan"))
        return (f"PUL {metrics['pul']:.1f}% (second evaluator {second:.1f}%), u-FID "
                f"{metrics[self.results['fid_name']]:.2f} (original "
                f"{metrics['original/' + self.results['fid_name']]:.2f})")

    def run(self) -> dict[str, Any]:
        start = time.perf_counter()
        self._stage(1, "pre-train the DDPM and collect the prior", self.pretrain)
        self._stage(2, "train the evaluation classifiers", self.classifier)
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


def _shown(value: float | None, spec: str = ".2f") -> str:
    return "—" if value is None or value != value else format(value, spec)


def _evaluator_rows(evaluation: dict[str, Any]) -> str:
    rows = []
    for name, scores in evaluation["paired"]["evaluators"].items():
        path = evaluation[name]
        rows.append(f"| `{path}` | {_shown(scores['pul'], '.1f')}% | "
                    f"{scores['forget_fraction_original']:.1%} → "
                    f"{scores['forget_fraction_unlearned']:.1%} | "
                    f"{scores['u_fid_original']:.2f} → {scores['u_fid']:.2f} | "
                    f"{_shown(scores['u_fid_ratio'])} | {scores['retained_drift']:.2f} |")
    return "\n".join(rows)


def _classifier_free(evaluation: dict[str, Any], forget: int) -> str:
    paired, likelihood = evaluation["paired"], evaluation["likelihood"]
    change, light = paired["sample_change"], paired["intensity"]
    lines = ["| measure | value |", "|---|---|"]
    if likelihood is not None:
        for part, what in (("forget", f"held-out real {forget}s"),
                           ("retain", "held-out real retained digits")):
            values = likelihood[part]
            lines.append(f"| bound of {what} ({values['images']} images), bits/dim, original → "
                         f"unlearned | {values['bits_per_dim_original']:.3f} → "
                         f"{values['bits_per_dim_unlearned']:.3f} "
                         f"({values['bits_per_dim_increase']:+.3f} ± "
                         f"{_shown(values['bits_per_dim_increase_se'], '.3f')}) |")
        lines.append(f"| forget increase − retain increase (bits/dim) | "
                     f"{_shown(likelihood['forget_minus_retain'], '+.3f')} |")
        lines.append(f"| selectivity: forget increase / retain increase (— when the retain "
                     f"increase is within noise) | {_shown(likelihood['selectivity'])} |")
    lines += [
        f"| same-seed pixel change, seeds whose original is a {forget} "
        f"({change['forgotten_seeds']}) | {_shown(change['forgotten'], '.3f')} |",
        f"| same-seed pixel change, the other seeds ({change['retained_seeds']}) | "
        f"{_shown(change['retained'], '.3f')} |",
        f"| ratio of the two (selective: well above 1) | {_shown(change['ratio'])} |",
        f"| mean intensity of the samples, original → unlearned | "
        f"{light['mean_original']:.3f} → {light['mean_unlearned']:.3f} |",
        f"| background ({light['border_pixels']}-pixel border), original → unlearned | "
        f"{light['background_original']:.3f} → {light['background_unlearned']:.3f} |",
    ]
    return "\n".join(lines)


_EVALUATOR_HEADER = """| evaluator | PUL | digit {forget} among samples | \
u-FID original → unlearned | ratio | retained drift |
|---|---|---|---|---|---|"""


def render_report(report: dict[str, Any], summaries: list[str]) -> str:
    """The Markdown report of a demo run."""
    evaluation, budget = report["evaluation"], report["budget"]
    metrics, forget = evaluation["metrics"], report["forget_class"]
    hist = evaluation["histograms"]
    rows = "\n".join(f"| {c} | {o} | {u} |" for c, (o, u) in
                     enumerate(zip(hist["original"], hist["unlearned"])))
    pul = (f"{metrics['pul']:.1f}%" if metrics["pul"] == metrics["pul"] else
           f"undefined: the original model generated no digit {forget}")
    paired = evaluation["paired"]
    gap, disagree = paired["pul_disagreement"], paired["evaluators_disagree"]
    agreement = {
        True: f"**The two evaluators disagree by {_shown(gap, '.1f')} points of PUL (more "
              f"than {paired['disagreement_threshold']:g}): do not trust either number before "
              "looking at the grid.**",
        False: f"The two evaluators agree within {_shown(gap, '.1f')} points of PUL.",
        None: "Their agreement is undefined: one evaluator found no digit "
              f"{forget} among the original's samples.",
    }[disagree]
    return f"""# VDU demo: forgetting digit {forget} of mnist5k

What was done (budget `{budget['name']}`, seed {report['seed']}):

{chr(10).join('- ' + line for line in summaries)}

The model is a DDPM pre-trained on mnist5k ({budget['image_size']}×{budget['image_size']}).
VDU's {report['prior']}. VDU minimised γ·S + (1−γ)·P with γ = {budget['gamma']},
lr {budget['lr']}, {budget['unlearn_steps']} steps on at most {budget['forget_size']} images of
digit {forget}, and nothing else (no retain data).

## Metrics by two evaluators

{evaluation['num_samples']} samples per model, the same noise for both ({evaluation['sampler']},
{evaluation['num_steps']} steps). Two classifiers of different architecture and seed label them;
both standardise each image first, so a global haze or contrast change does not move them.
PUL is the share of digit-{forget} samples removed; u-FID compares the samples with the real
images of the retained digits on each classifier's own features (lower is better; the ratio
says what unlearning cost); the drift is the total variation between the retained-digit mixes.

{_EVALUATOR_HEADER.format(forget=forget)}
{_evaluator_rows(evaluation)}

PUL by the first evaluator: {pul}. {agreement}

## Measures that need no classifier

What the model says about held-out real images it never saw (the variational bound of the
DDPM in bits per dimension: lower means the model explains the image better), how much each
seed's sample changed (mean absolute pixel change on [−1, 1]), and whether the samples as a
whole got brighter or darker:

{_classifier_free(evaluation, forget)}

A model that forgot digit {forget} and kept the rest raises the bound of the {forget}s much more
than that of the other digits, changes the samples of the seeds that drew a {forget} much more
than the others, and does not shift the background.

## Pictures

The same seeds through the original (left) and the unlearned model (right); under each sample
the first evaluator's label and confidence; seeds whose original is a {forget} are framed in red:

![before and after](before_after.png)

Class histogram of the samples (first evaluator):

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
