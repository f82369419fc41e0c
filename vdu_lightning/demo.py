"""``vdu demo``: the whole story on mnist5k, from nothing to a report, offline.

    vdu demo                       # forget digit 1, write ./vdu-demo
    vdu demo --forget-class 7 --output out/seven
    vdu demo --quick               # tiny budgets: a minute, for CI and a first look

Stages, each with a progress bar and a one-line summary: (1) pre-train a DDPM on mnist5k
while ``PriorSnapshot`` collects VDU's trajectory prior, (2) train the two evaluation
classifiers, (3) unlearn the digit with ``VDUModule``, (4) evaluate (PUL and u-FID by both
evaluators, the measures that need no classifier, class histograms, a captioned grid) and
write the report. Stages 1 and 2 are cached under ``--cache-dir`` by their settings, and so
are the original model's samples, so a second run starts at stage 3.

Each run is one of the shipped configs, read when the demo starts (``RUNS``): the model, the
data, the step budget and the callbacks' settings of configs/mnist5k/{pretrain,classifier,
classifier_lenet,vdu}.yaml, changed only where ``overrides`` says and by the demo's own paths,
digit and ``--seed``; so the demo runs what ``vdu fit --config`` runs.
"""

from __future__ import annotations

import argparse
import copy
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

from vdu_lightning import (
    ClassifierModule,
    DiffusionModule,
    ForgetSetDataModule,
    ImageDataModule,
    ParameterPrior,
    VDUModule,
)
from vdu_lightning.callbacks import (
    CheckpointPrior,
    ExportPretrained,
    PriorSnapshot,
    UnlearningEvaluation,
    UnlearningGuard,
)
from vdu_lightning.callbacks.evaluation import json_plain
from vdu_lightning.config_files import load_config, tiny_unet
from vdu_lightning.files import atomic_write_text
from vdu_lightning.model_card import describe_forget_set

#: Each run of the demo: its config (under configs/) and the model, data and callback classes
#: the config must name. The demo builds these classes itself (without its paths, logger and
#: checkpoints), so a config that named others would be a recipe the demo does not run.
RUNS = {
    "pretrain": ("mnist5k/pretrain.yaml", "DiffusionModule", "ImageDataModule",
                 ("PriorSnapshot",)),
    "classifier": ("mnist5k/classifier.yaml", "ClassifierModule", "ImageDataModule", ()),
    "second_classifier": ("mnist5k/classifier_lenet.yaml", "ClassifierModule",
                          "ImageDataModule", ()),
    "unlearn": ("mnist5k/vdu.yaml", "VDUModule", "ForgetSetDataModule",
                ("UnlearningGuard", "UnlearningEvaluation")),
}
#: The evaluation classifiers (stage 2): their runs, and their folders in the cache.
CLASSIFIERS = ("classifier", "second_classifier")
#: What a config's trainer gives the demo: the budget. The rest (devices, logging, checkpoints,
#: validation during fit) the demo sets itself: one device, no logger, no checkpoint.
BUDGET_KEYS = ("max_steps", "max_epochs")
#: The budget's settings by the flat names the report, metrics.json and
#: notebooks/01_quickstart.ipynb read (``budget.unet``): where each is, as in ``overrides``.
FIELDS = {
    "unet": "pretrain.model.unet",
    "image_size": "pretrain.data.image_size",
    "pretrain_steps": "pretrain.trainer.max_steps",
    "pretrain_batch_size": "pretrain.data.batch_size",
    "pretrain_lr": "pretrain.model.lr",
    "warmup_steps": "pretrain.model.warmup_steps",
    "ema_decay": "pretrain.model.ema_decay",
    "snapshot_every": "pretrain.PriorSnapshot.every_n_steps",
    "snapshot_start": "pretrain.PriorSnapshot.start_step",
    "classifier_epochs": "classifier.trainer.max_epochs",
    "second_classifier_epochs": "second_classifier.trainer.max_epochs",
    "unlearn_steps": "unlearn.trainer.max_steps",
    "unlearn_batch_size": "unlearn.data.batch_size",
    "gamma": "unlearn.model.gamma",
    "lr": "unlearn.model.lr",
    "forget_size": "unlearn.data.forget_size",
    "num_samples": "unlearn.UnlearningEvaluation.num_samples",
    "sample_steps": "unlearn.UnlearningEvaluation.num_steps",
}


def overrides(budget: str, configs: str | os.PathLike | None = None) -> dict[str, Any]:
    """Everything the budget ``budget`` (``"full"`` or ``"quick"``) changes in the configs, as
    ``{"run.section.key": value}``; a section is ``model``, ``data``, ``trainer`` or a
    callback's class name. ``configs``: the configs folder (default: the checkout's)."""
    def sampling(steps: int, samples: int) -> dict[str, Any]:
        # DDIM-25 on 500 samples per model, not vdu.yaml's DDIM-50 on 1,000: the evaluation of
        # both models in a few minutes on a CPU; VDUModule.sample draws with as many steps.
        return {"unlearn.model.sample_steps": steps,
                "unlearn.UnlearningEvaluation.num_steps": steps,
                "unlearn.UnlearningEvaluation.num_samples": samples}

    if budget == "full":
        return sampling(steps=25, samples=500)
    if budget != "quick":
        raise ValueError(f"budget must be 'full' or 'quick', got {budget!r}")
    # About a minute on a CPU: the tests' tiny UNet at its own 8×8 size, every budget cut.
    unet = tiny_unet(configs)
    return sampling(steps=4, samples=64) | {
        f"{run}.data.image_size": unet["sample_size"] for run in RUNS} | {
        "pretrain.model.unet": unet,
        "pretrain.trainer.max_steps": 40,
        "pretrain.model.warmup_steps": 5,
        "pretrain.model.ema_decay": 0.9,
        "pretrain.PriorSnapshot.every_n_steps": 10,
        "pretrain.PriorSnapshot.start_step": 10,
        "classifier.trainer.max_epochs": 1,
        "second_classifier.trainer.max_epochs": 1,
        "unlearn.trainer.max_steps": 10,
        "unlearn.data.batch_size": 16,
        "unlearn.model.gamma": 0.5,
        "unlearn.model.lr": 1e-3,
        "unlearn.data.forget_size": 64,
    }


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of the demo: its config's seed and the init args of what the demo builds."""

    config: str
    seed: int
    #: By section: ``model``, ``data``, ``trainer`` (the budget) and each callback's class name.
    init_args: dict[str, dict[str, Any]]

    @classmethod
    def read(cls, name: str, configs: str | os.PathLike | None = None) -> Run:
        """The run ``name`` of ``RUNS`` as its config gives it."""
        config_name, model_class, data_class, callback_classes = RUNS[name]
        config = load_config(config_name, configs)
        init_args = {}
        for section, wanted in (("model", model_class), ("data", data_class)):
            class_path = config[section]["class_path"]
            if class_path.rsplit(".", 1)[-1] != wanted:
                raise ValueError(f"configs/{config_name}: vdu demo runs a {wanted} as its "
                                 f"{section}, the config names {class_path}")
            init_args[section] = dict(config[section].get("init_args") or {})
        trainer = config.get("trainer") or {}
        init_args["trainer"] = {key: trainer[key] for key in BUDGET_KEYS if key in trainer}
        callbacks = {c["class_path"].rsplit(".", 1)[-1]: dict(c.get("init_args") or {})
                     for c in trainer.get("callbacks") or []}
        for wanted in callback_classes:
            if wanted not in callbacks:
                raise ValueError(f"configs/{config_name}: vdu demo needs its {wanted} "
                                 "callback, the config has none")
            init_args[wanted] = callbacks[wanted]
        return cls(config_name, int(config.get("seed_everything") or 0), init_args)

    def args(self, section: str, **changes: Any) -> dict[str, Any]:
        """The init args of ``section`` with ``changes`` (the demo's paths and digit): a copy,
        as what is built may keep and change what it is given."""
        return copy.deepcopy(self.init_args[section]) | changes


@dataclasses.dataclass(frozen=True)
class Budget:
    """Every setting of a demo run: ``runs`` by the names of ``RUNS``; the ``FIELDS`` as
    attributes (``budget.unet``). The pre-training and classifier runs key the cache."""

    name: str
    runs: dict[str, Run]

    @classmethod
    def read(cls, name: str, configs: str | os.PathLike | None = None) -> Budget:
        """The budget ``name``: the configs with its ``overrides``."""
        runs = {run: Run.read(run, configs) for run in RUNS}
        for where, value in overrides(name, configs).items():
            run, section, key = where.split(".")
            runs[run].init_args[section][key] = value
        return cls(name, runs)

    def __getattr__(self, name: str) -> Any:
        if name not in FIELDS or "runs" not in self.__dict__:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        run, section, key = FIELDS[name].split(".")
        return copy.deepcopy(self.runs[run].init_args[section][key])

    def summary(self) -> dict[str, Any]:
        """The name and the ``FIELDS``: what the report shows."""
        return {"name": self.name} | {field: getattr(self, field) for field in FIELDS}

    def with_seed(self, seed: int) -> Budget:
        """Pre-training and unlearning under ``seed``; the classifiers keep their own, which
        make them two evaluators that fail in different ways."""
        return dataclasses.replace(self, runs={
            name: dataclasses.replace(run, seed=seed) if name in ("pretrain", "unlearn") else run
            for name, run in self.runs.items()})

    def key(self, stage: str) -> str:
        names = {"pretrain": ["pretrain"], "classifier": list(CLASSIFIERS)}[stage]
        text = json.dumps({n: dataclasses.asdict(self.runs[n]) for n in names}, sort_keys=True)
        return f"{stage}-{self.name}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def __getattr__(name: str) -> Any:
    # FULL, QUICK and EVALUATORS are read from the configs when first asked for, not when the
    # module is imported: without a configs folder the demo can still say so cleanly.
    if name in ("FULL", "QUICK"):
        return Budget.read(name.lower())
    if name == "EVALUATORS":
        return evaluators(Budget.read("full"))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def evaluators(budget: Budget) -> dict[str, tuple[str, int, float]]:
    """The evaluation classifiers of ``budget``: (architecture, seed, lr) by name."""
    return {name: (budget.runs[name].init_args["model"]["architecture"],
                   budget.runs[name].seed, budget.runs[name].init_args["model"]["lr"])
            for name in CLASSIFIERS}


_DONE = "done.json"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vdu_lightning" / "demo"


class Demo:
    """One demo run: the stages in order, their summaries, and the files they write."""

    def __init__(self, budget: Budget, forget_class: int, output: Path, cache_dir: Path,
                 accelerator: str = "auto", seed: int | None = None) -> None:
        if not 0 <= forget_class <= 9:
            raise ValueError(f"--forget-class must be a digit 0-9, got {forget_class}")
        self.budget = budget if seed is None else budget.with_seed(seed)
        self.forget_class = forget_class
        #: The seed of the unlearning and of the evaluation's noise (vdu.yaml's by default).
        self.seed = self.budget.runs["unlearn"].seed
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
        folder = self.cache_dir / self.budget.key(stage)
        done = folder / _DONE
        return folder, json.loads(done.read_text()) if done.is_file() else None

    # ---- stage 1: the pre-trained DDPM and its trajectory prior ------------------------------
    def pretrain(self) -> str:
        folder, done = self._cached("pretrain")
        self.model_dir, self.prior_path = folder / "ddpm", folder / "prior.safetensors"
        if done is not None:
            self.prior_description = done["prior"]
            return f"cached in {folder} ({done['prior']})"
        run = self.budget.runs["pretrain"]
        pl.seed_everything(run.seed, verbose=False)
        module = DiffusionModule(**run.args("model"))
        data = ImageDataModule(**run.args("data"))
        snapshot = PriorSnapshot(**run.args("PriorSnapshot", path=str(self.prior_path)))
        trainer = self._trainer([snapshot, ExportPretrained(str(self.model_dir))],
                                **run.args("trainer"), limit_val_batches=0)
        trainer.fit(module, datamodule=data)
        self.prior_description = ParameterPrior.load(self.prior_path).describe()
        atomic_write_text(folder / _DONE, json.dumps({"prior": self.prior_description}))
        return (f"{run.init_args['trainer']['max_steps']} steps, exported to {self.model_dir}; "
                f"{self.prior_description}")

    # ---- stage 2: the two evaluation classifiers ----------------------------------------------
    def classifier(self) -> str:
        folder, done = self._cached("classifier")
        self.classifier_dirs = {name: folder / name for name in CLASSIFIERS}
        if done is not None:
            return f"cached in {folder} (held-out accuracy {self._accuracies(done)})"
        accuracies = {}
        for name in CLASSIFIERS:
            run = self.budget.runs[name]
            pl.seed_everything(run.seed, verbose=False)
            module = ClassifierModule(**run.args("model"))
            data = ImageDataModule(**run.args("data"))
            trainer = self._trainer([ExportPretrained(str(self.classifier_dirs[name]))],
                                    **run.args("trainer"))
            trainer.fit(module, datamodule=data)
            accuracies[name] = float(trainer.callback_metrics["val/acc"])
        atomic_write_text(folder / _DONE, json.dumps({"accuracy": accuracies}))
        return (f"held-out accuracy {self._accuracies({'accuracy': accuracies})}, exported to "
                f"{folder}")

    def _accuracies(self, done: dict[str, Any]) -> str:
        architectures = {name: architecture for name, (architecture, _, _)
                         in evaluators(self.budget).items()}
        return ", ".join(f"{value:.1%} ({architectures[name]})"
                         for name, value in done["accuracy"].items())

    # ---- stage 3: VDU -------------------------------------------------------------------------
    def unlearn(self) -> str:
        run = self.budget.runs["unlearn"]
        pl.seed_everything(run.seed, verbose=False)
        self.data = ForgetSetDataModule(**run.args("data", forget_classes=[self.forget_class]))
        self.module = VDUModule(**run.args("model", pretrained=str(self.model_dir)))
        trainer = self._trainer([CheckpointPrior(prior=str(self.prior_path)),
                                 UnlearningGuard(**run.args("UnlearningGuard"))],
                                **run.args("trainer"), limit_val_batches=0)
        trainer.fit(self.module, datamodule=self.data)
        terms = {k: float(v) for k, v in self.module.loss_terms.items()}
        return (f"{run.init_args['trainer']['max_steps']} steps on {len(self.data.forget_set)} "
                f"images of digit "
                f"{self.forget_class}; last stability {terms['stability']:.3g}, "
                f"plasticity {terms['plasticity']:.3g}")

    # ---- stage 4: evaluation and the report --------------------------------------------------
    def evaluate(self) -> str:
        run = self.budget.runs["unlearn"]
        self.output.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.output, prefix=".evaluation-") as scratch:
            evaluation = UnlearningEvaluation(**run.args(
                "UnlearningEvaluation", classifier=str(self.classifier_dirs["classifier"]),
                second_classifier=str(self.classifier_dirs["second_classifier"]),
                seed=self.seed, cache_dir=str(self.cache_dir / "evaluation"), dirpath=scratch))
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
            "forget_class": self.forget_class, "budget": self.budget.summary(),
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
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of pre-training and unlearning (default: their configs' "
                             "seed_everything, 0)")
    parser.add_argument("--configs", default=None,
                        help="the configs/ folder whose mnist5k runs the demo runs (default: "
                             "the one beside the package, in a source checkout)")
    options = parser.parse_args(args)
    output = Path(options.output)
    if output.exists() and not output.is_dir():
        parser.exit(2, f"vdu demo: error: --output {output} exists and is not a directory\n")
    try:
        budget = Budget.read("quick" if options.quick else "full", options.configs)
        demo = Demo(budget, options.forget_class, output,
                    Path(options.cache_dir) if options.cache_dir else default_cache_dir(),
                    options.accelerator, options.seed)
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"vdu demo: error: {err}\n")
    demo.run()


# EVALUATORS, FULL and QUICK are the module's __getattr__'s, which flake8 cannot see.
__all__ = ["EVALUATORS", "FULL", "QUICK", "RUNS", "Budget", "Demo", "Run",  # noqa: F822
           "demo_command", "evaluators", "overrides", "render_report"]
