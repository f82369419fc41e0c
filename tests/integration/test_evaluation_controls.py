"""The evaluation's controls and the evaluators' robustness, on real mnist5k digits.

Both evaluators are trained here with the recipes of configs/mnist5k/classifier.yaml and
classifier_lenet.yaml (fewer epochs: the controls need a good evaluator, not the best).
The held-out digits, which neither evaluator trained on, stand for the original model's
samples. Every evaluation path must pass the three controls: the comparison the benchmarks
use (``PairedEvaluation``), ``UnlearningEvaluation`` through a real ``Trainer.validate``, and
the unlearning accuracy of the one-step benchmark.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml

from conftest import CONFIGS, REPO
from evaluation_helpers import one_thread
from vdu_lightning import ClassifierModule, ForgetSetDataModule, ImageDataModule
from vdu_lightning.callbacks import UnlearningEvaluation
from vdu_lightning.diffusion import seeded_noise
from vdu_lightning.evaluation import (
    PairedEvaluation,
    haze_control,
    load_classifier,
    perfect_forgetter_control,
)
from vdu_lightning.evaluation.photometric import offset

FORGET = 1
#: Epochs per evaluator here (the configs train 10 and 25).
EPOCHS = {"classifier": 3, "classifier_lenet": 8}


@pytest.fixture(scope="module")
def evaluators(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Both evaluators, trained by the shipped recipes, as directories."""
    root = tmp_path_factory.mktemp("evaluators")
    for name, epochs in EPOCHS.items():
        config = yaml.safe_load((CONFIGS / "mnist5k" / f"{name}.yaml").read_text())
        pl.seed_everything(config["seed_everything"], verbose=False)
        module = ClassifierModule(**config["model"]["init_args"])
        data = ImageDataModule(**config["data"]["init_args"])
        trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=root)
        trainer.fit(module, datamodule=data)
        module.save_pretrained(root / name)
    return {name: root / name for name in EPOCHS}


@pytest.fixture(scope="module")
def digits() -> dict[str, torch.Tensor]:
    data = ImageDataModule(dataset="mnist5k", image_size=16)
    held_out, train = data.load("val"), data.load("train")
    return {"images": held_out.images, "labels": held_out.labels,
            "retained": train.images[train.labels != FORGET]}


@pytest.mark.parametrize("name", list(EPOCHS))
def test_the_evaluators_read_real_digits_the_same_through_a_haze(
        evaluators: dict[str, Path], digits: dict[str, torch.Tensor], name: str) -> None:
    """The guard of the evaluator's robustness: the classifier the evaluation used before
    changed 43% of these labels under +0.1 and 88% under +0.2 (clipped, as here)."""
    net = load_classifier(evaluators[name])
    clean = net.predict(digits["images"])[0]
    assert (clean == digits["labels"]).float().mean() > 0.95
    for amount in (0.1, -0.1, 0.2, -0.2):
        changed = net.predict(offset(digits["images"], amount))[0] != clean
        assert changed.float().mean() <= 0.02, (amount, float(changed.float().mean()))


def _controls(evaluators: dict[str, Path], digits: dict[str, torch.Tensor]
              ) -> dict[str, torch.Tensor]:
    images = digits["images"]
    labels = load_classifier(evaluators["classifier"]).predict(images)[0]
    return {"identity": images, "haze": haze_control(images, 0.075),
            "perfect": perfect_forgetter_control(images, labels, [FORGET], digits["retained"])}


def _check(control: str, pul: float, ratio: float) -> None:
    if control == "identity":
        assert pul == 0.0 and ratio == pytest.approx(1.0, abs=1e-6)
    elif control == "haze":
        assert pul <= 5.0 and ratio <= 1.1, (pul, ratio)
    else:
        assert pul >= 95.0 and ratio <= 1.1, (pul, ratio)


def test_the_paired_comparison_passes_the_controls(evaluators: dict[str, Path],
                                                   digits: dict[str, torch.Tensor]) -> None:
    nets = {name: load_classifier(path) for name, path in evaluators.items()}
    paired = PairedEvaluation(nets, [FORGET], digits["retained"])
    for control, unlearned in _controls(evaluators, digits).items():
        result = paired.compare(digits["images"], unlearned)
        for name, scores in result["evaluators"].items():
            _check(control, scores["pul"], scores["u_fid_ratio"])
        assert not result["evaluators_disagree"]
        # What needs no classifier sees the haze for what it is: a shift, not a forgetting.
        shift = result["intensity"]["background_shift"]
        assert shift == pytest.approx(0.075 if control == "haze" else 0.0,
                                      abs=0.01 if control == "perfect" else 1e-3)
        if control == "perfect":
            assert result["sample_change"]["retained"] == 0.0
            assert result["sample_change"]["forgotten"] > 0.2  # another digit drawn


class RealDigits(pl.LightningModule):
    """Stands for an unlearning module: noise i "samples" held-out digit i (``original``) or
    its control version; the seeded noise is the one the callback draws."""

    def __init__(self, original: torch.Tensor, unlearned: torch.Tensor, seed: int) -> None:
        super().__init__()
        self.images = {True: original, False: unlearned}
        noise = seeded_noise(len(original), tuple(original.shape[1:]), seed)
        self.index = {float(n.flatten()[0]): i for i, n in enumerate(noise)}
        self.weight = torch.nn.Parameter(torch.zeros(()))

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.images[True].shape[1:])

    def sample_from(self, noise: torch.Tensor, original: bool = False,
                    num_steps: int | None = None) -> torch.Tensor:
        rows = [self.index[float(n.flatten()[0])] for n in noise.cpu()]
        return self.images[original][rows]

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        pass


def test_unlearning_evaluation_passes_the_controls(tmp_path: Path, evaluators: dict[str, Path],
                                                   digits: dict[str, torch.Tensor]) -> None:
    data = ForgetSetDataModule(dataset="mnist5k", image_size=16, forget_classes=[FORGET],
                               eval_size=8, batch_size=8)
    for control, unlearned in _controls(evaluators, digits).items():
        callback = UnlearningEvaluation(
            classifier=str(evaluators["classifier"]),
            second_classifier=str(evaluators["classifier_lenet"]),
            num_samples=len(digits["images"]), seed=4, grid_images=4,
            dirpath=str(tmp_path / control))
        trainer = pl.Trainer(accelerator="cpu", logger=False, limit_val_batches=1,
                             enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[callback])
        with one_thread():
            trainer.validate(RealDigits(digits["images"], unlearned, seed=4), datamodule=data)
        results = json.loads((tmp_path / control / "evaluation_step_0000000.json").read_text())
        metrics = results["metrics"]
        _check(control, metrics["pul"], metrics["u_fid_ratio"])
        _check(control, metrics["second_classifier/pul"],
               metrics["second_classifier/u_fid_ratio"])
        assert results["likelihood"] is None  # a stand-in: no networks to score


def test_the_one_step_unlearning_accuracy_passes_the_controls(
        evaluators: dict[str, Path], digits: dict[str, torch.Tensor]) -> None:
    """UA (1 − accuracy on the forgotten label's samples), as benchmarks/one_step_evaluation.py
    computes it, with the held-out digits as samples drawn for their own labels."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from one_step_evaluation import scores
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    labels = digits["labels"]
    for name, path in evaluators.items():
        net = load_classifier(path)
        results = {control: scores(net.predict(images)[0], labels, [FORGET], 10)
                   for control, images in _controls(evaluators, digits).items()}
        # A generator that draws real 1s for label 1 forgets nothing: UA is the error rate.
        assert results["identity"]["ua"] <= 5.0
        assert abs(results["haze"]["ua"] - results["identity"]["ua"]) <= 2.0
        assert results["haze"]["class_consistency"] >= 95.0
        # The perfect forgetter's 1s were replaced (as the first evaluator reads them).
        assert results["perfect"]["ua"] >= 95.0
