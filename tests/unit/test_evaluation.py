"""UnlearningEvaluation through real Trainer.validate runs, checked against direct computations;
and what every evaluation callback inherits from EvaluationCallback, on the smallest one."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel
from PIL import Image

from evaluation_helpers import (
    RecordingWandbLogger,
    TinyUnlearner,
    one_thread,
    perturb,
    tiny_classifier,
)
from vdu_lightning import ClassifierModule, ForgetSetDataModule
from vdu_lightning.callbacks.evaluation import UnlearningEvaluation
from vdu_lightning.callbacks.evaluation_base import EvaluationCallback, u_fid_metrics
from vdu_lightning.diffusion import seeded_noise
from vdu_lightning.evaluation import before_after_grid, load_classifier, variational_bound
from vdu_lightning.evaluation.cache import OriginalCache
from vdu_lightning.metrics import UnlearnedFID, percent_unlearned

SETTINGS = {"num_samples": 40, "seed": 5, "num_steps": 2, "batch_size": 16,
            "num_reference": 150, "grid_images": 6, "likelihood_timesteps": 3}
FID_NAME = "u_fid/classifier/ddim2"


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


@pytest.fixture(scope="module")
def direct(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Samples, labels and FIDs computed directly, without the callback."""
    with one_thread():
        return _direct(tmp_path_factory.mktemp("direct"))


def _direct(root: Path) -> dict:
    tiny_classifier(root / "classifier")
    tiny_classifier(root / "second", seed=1, architecture="lenet")
    module = TinyUnlearner()
    noise = seeded_noise(SETTINGS["num_samples"], module.sample_shape, SETTINGS["seed"])
    samples = {name: module.sample_from(noise, original=name == "original", num_steps=2)
               for name in ("original", "unlearned")}
    readings, fids = {}, {}
    for evaluator in ("classifier", "second"):
        net = load_classifier(root / evaluator)
        readings[evaluator] = {name: net.predict(images) for name, images in samples.items()}
    labels = {name: reading[0] for name, reading in readings["classifier"].items()}
    forget = int(torch.bincount(labels["original"]).argmax())  # so that n_orig > 0
    data = ForgetSetDataModule(dataset="digits", forget_classes=[forget], eval_size=8)
    train = data.load("train")
    members = torch.nonzero(train.labels != forget).flatten()
    chosen = torch.randperm(len(members), generator=torch.Generator().manual_seed(
        SETTINGS["seed"]))[:SETTINGS["num_reference"]]
    reference = train.images[torch.sort(members[chosen]).values]
    for evaluator in ("classifier", "second"):
        fid = UnlearnedFID(classifier=load_classifier(root / evaluator), num_steps=2)
        fid.update(reference, real=True)
        for name, images in samples.items():
            fid.update(images, real=False)
            fids[evaluator, name] = fid.compute().item()
            fid.reset()
    data.setup("validate")
    held_out = {part: torch.stack([item["image"] for item in getattr(data, f"{part}_eval_set")])
                for part in ("forget", "retain")}
    bounds = {(name, part): variational_bound(
        module.original_unet if name == "original" else module.unet,
        module.scheduler.betas, images, timesteps=3, seed=SETTINGS["seed"]).bits_per_dim
        for name in ("original", "unlearned") for part, images in held_out.items()}
    return {"classifier": root / "classifier", "second": root / "second", "samples": samples,
            "labels": labels, "readings": readings, "forget": forget, "fids": fids,
            "bounds": bounds}


def _datamodule(forget: int) -> ForgetSetDataModule:
    return ForgetSetDataModule(dataset="digits", forget_classes=[forget], forget_size=8,
                               eval_size=8, batch_size=8)


def _trainer(logger: object = False, **kwargs: object) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", logger=logger, limit_val_batches=1,
                      limit_test_batches=1, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, **kwargs)


def test_validate_matches_a_direct_computation(tmp_path: Path, direct: dict) -> None:
    module, data = TinyUnlearner(), _datamodule(direct["forget"])
    callback = UnlearningEvaluation(classifier=str(direct["classifier"]),
                                    second_classifier=str(direct["second"]), **SETTINGS)
    logger = RecordingWandbLogger(str(tmp_path / "logs"))
    _trainer(logger, callbacks=[callback]).validate(module, datamodule=data)

    out = tmp_path / "logs" / "evaluation" / "run0"  # one folder per W&B run
    results = json.loads((out / "evaluation_step_0000000.json").read_text())
    hist = results["histograms"]
    for name in ("original", "unlearned"):
        expected = torch.bincount(direct["labels"][name], minlength=10).tolist()
        assert hist[name] == expected
    forget = direct["forget"]
    metrics = results["metrics"]
    assert results["forget_classes"] == [forget] and results["num_samples"] == 40
    assert results["stage"] == "validate"
    assert (results["sampler"], results["num_steps"], results["features"]) == (
        "ddim", 2, "classifier")
    assert metrics["pul"] == pytest.approx(
        percent_unlearned(hist["original"][forget], hist["unlearned"][forget]).item())
    assert metrics["forget_fraction_original"] == hist["original"][forget] / 40
    assert metrics["forget_fraction_unlearned"] == hist["unlearned"][forget] / 40
    fids = direct["fids"]
    assert metrics[FID_NAME] == pytest.approx(fids["classifier", "unlearned"], rel=1e-5)
    assert metrics[f"original/{FID_NAME}"] == pytest.approx(fids["classifier", "original"],
                                                            rel=1e-5)
    assert metrics["u_fid_ratio"] == pytest.approx(
        fids["classifier", "unlearned"] / fids["classifier", "original"], rel=1e-5)
    assert metrics[FID_NAME] != pytest.approx(metrics[f"original/{FID_NAME}"])
    assert results["num_reference"] == 150
    assert callback.results["metrics"] == pytest.approx(metrics)
    logged = {k: v for entry in logger.metrics for k, v in entry.items()}
    assert logged[f"eval/{FID_NAME}"] == pytest.approx(metrics[FID_NAME])
    assert logged["eval/pul"] == pytest.approx(metrics["pul"])

    # The second evaluator, scored alike, and the gap between the two.
    second = results["paired"]["evaluators"]["second_classifier"]
    second_hist = [torch.bincount(direct["readings"]["second"][name][0], minlength=10).tolist()
                   for name in ("original", "unlearned")]
    assert [second["histogram_original"], second["histogram_unlearned"]] == second_hist
    assert second["u_fid_ratio"] == pytest.approx(
        fids["second", "unlearned"] / fids["second", "original"], rel=1e-5)
    assert logged["eval/second_classifier/pul"] == pytest.approx(second["pul"], nan_ok=True)

    # The measures that need no classifier.
    original, unlearned = direct["samples"]["original"], direct["samples"]["unlearned"]
    change = (unlearned - original).abs().flatten(1).mean(1)
    forgotten = direct["labels"]["original"] == forget
    assert metrics["sample_change/forgotten"] == pytest.approx(float(change[forgotten].mean()))
    assert metrics["sample_change/retained"] == pytest.approx(float(change[~forgotten].mean()))
    assert metrics["intensity/mean_shift"] == pytest.approx(
        float(unlearned.mean() - original.mean()), abs=1e-6)
    bounds = direct["bounds"]
    for part in ("forget", "retain"):
        increase = (bounds["unlearned", part] - bounds["original", part]).mean()
        assert metrics[f"likelihood/{part}_bpd_increase"] == pytest.approx(float(increase))
    assert results["likelihood"]["forget"]["images"] == 8

    # The grid: the original's first samples left, the unlearned model's right, captioned.
    readings = direct["readings"]["classifier"]
    expected = before_after_grid(original[:6], unlearned[:6],
                                 tuple(t[:6] for t in readings["original"]),
                                 tuple(t[:6] for t in readings["unlearned"]), [forget],
                                 evaluator="the classifier")
    written = np.asarray(Image.open(out / "samples_step_0000000.png").convert("RGB"))
    np.testing.assert_array_equal(written, np.asarray(expected))
    Image.open(out / "histogram_step_0000000.png").verify()
    assert [(i["key"], i["step"]) for i in logger.images] == [("eval/samples", 0)]

    # The original's samples are cached: a second validation samples only the unlearned model.
    assert module.calls == {"original": 3, "unlearned": 3}
    _trainer(callbacks=[callback]).validate(module, datamodule=data)
    assert module.calls == {"original": 3, "unlearned": 6}
    assert callback.results["metrics"] == pytest.approx(metrics)


def test_identical_models_give_zero_pul_and_unit_ratio(tmp_path: Path, direct: dict) -> None:
    callback = UnlearningEvaluation(classifier=str(direct["classifier"]), dirpath="out",
                                    **SETTINGS)
    trainer = _trainer(callbacks=[callback])
    trainer.test(TinyUnlearner(same=True), datamodule=_datamodule(direct["forget"]))
    results = json.loads((tmp_path / "out" / "evaluation_step_0000000.json").read_text())
    assert results["stage"] == "test"
    assert results["histograms"]["original"] == results["histograms"]["unlearned"]
    assert results["metrics"]["pul"] == 0.0
    assert results["metrics"]["u_fid_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert trainer.callback_metrics["eval/pul"] == 0.0


@pytest.mark.filterwarnings("ignore:.*rank-deficient covariance")
def test_fit_evaluates_only_when_asked_and_never_in_the_sanity_check(tmp_path: Path,
                                                                     direct: dict) -> None:
    settings = dict(SETTINGS, num_samples=8, batch_size=8, num_reference=20)
    for during_fit in (False, True):
        module = TinyUnlearner()
        callback = UnlearningEvaluation(classifier=str(direct["classifier"]),
                                        dirpath=f"fit_{during_fit}", during_fit=during_fit,
                                        **settings)
        _trainer(callbacks=[callback], max_epochs=1, limit_train_batches=1,
                 num_sanity_val_steps=1).fit(module, datamodule=_datamodule(direct["forget"]))
        files = sorted(p.name for p in (tmp_path / f"fit_{during_fit}").glob("*.json"))
        if during_fit:
            assert module.calls == {"original": 1, "unlearned": 1}
            assert files == ["evaluation_step_0000001.json"]
        else:
            assert module.calls == {"original": 0, "unlearned": 0} and files == []


def test_user_errors_are_raised_before_any_sampling(tmp_path: Path, direct: dict) -> None:
    data = _datamodule(direct["forget"])
    module = TinyUnlearner()
    missing = UnlearningEvaluation(classifier=str(tmp_path / "no_classifier"))
    with pytest.raises(FileNotFoundError, match="no_classifier"):
        _trainer(callbacks=[missing]).validate(module, datamodule=data)
    ClassifierModule(in_channels=1, num_classes=5, width=8).save_pretrained(tmp_path / "five")
    with pytest.raises(ValueError, match="has 5 classes but the data set has 10"):
        _trainer(callbacks=[UnlearningEvaluation(classifier=str(tmp_path / "five"))]).validate(
            module, datamodule=data)
    assert module.calls == {"original": 0, "unlearned": 0}

    class NoSampler(pl.LightningModule):
        def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
            pass

    with pytest.raises(TypeError, match="NoSampler lacks them"):
        _trainer(callbacks=[UnlearningEvaluation(classifier=str(direct["classifier"]))]
                 ).validate(NoSampler(), datamodule=data)
    with pytest.raises(ValueError, match="num_samples must be an int >= 2, got 1"):
        UnlearningEvaluation(classifier="c", num_samples=1)


@pytest.mark.filterwarnings("ignore:.*rank-deficient covariance")
def test_the_cache_dir_spares_the_original_and_never_serves_another_setting(
        tmp_path: Path, direct: dict) -> None:
    data = _datamodule(direct["forget"])
    settings = dict(SETTINGS, num_samples=12, grid_images=0, cache_dir="cache")

    def run(**changes: object) -> tuple[TinyUnlearner, dict]:
        module = TinyUnlearner()
        callback = UnlearningEvaluation(classifier=str(direct["classifier"]),
                                        **dict(settings, **changes))
        _trainer(callbacks=[callback]).validate(module, datamodule=data)
        return module, callback.results

    first, results = run()
    assert first.calls["original"] > 0 and len(list((tmp_path / "cache").glob("*.pt"))) == 1
    again, cached = run()
    assert again.calls["original"] == 0 and again.calls["unlearned"] > 0
    assert cached["metrics"] == pytest.approx(results["metrics"], nan_ok=True)
    for change in ({"seed": 6}, {"num_steps": 3}, {"likelihood_timesteps": 2}):
        other, _ = run(**change)
        assert other.calls["original"] > 0, change
    # Another original network (same settings) is never served the cached samples.
    changed = TinyUnlearner()
    perturb(changed.original.ema_unet, seed=9, scale=1e-4)
    _trainer(callbacks=[UnlearningEvaluation(classifier=str(direct["classifier"]),
                                             **settings)]).validate(changed, datamodule=data)
    assert changed.calls["original"] > 0
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 5


def test_a_conditional_model_draws_sample_i_with_label_i_mod_c(direct: dict) -> None:
    data = _datamodule(direct["forget"])
    samples = []
    for batch_size in (16, 7):
        module = TinyUnlearner(num_classes=10)
        callback = UnlearningEvaluation(classifier=str(direct["classifier"]),
                                        **dict(SETTINGS, batch_size=batch_size, grid_images=0))
        _trainer(callbacks=[callback]).validate(module, datamodule=data)
        seen = torch.cat(module.labels_seen[:len(module.labels_seen) // 2])
        assert seen.tolist() == (torch.arange(SETTINGS["num_samples"]) % 10).tolist()
        samples.append(callback.results["metrics"])
        assert callback.results["likelihood"] is not None
    assert samples[0] == pytest.approx(samples[1], rel=1e-4, nan_ok=True)


# ---- the base every evaluation callback shares ---------------------------------------------
class ConstantEvaluation(EvaluationCallback):
    """The smallest evaluation: the original model "makes" ones, the unlearned one threes;
    each rank makes its share of four entries. It records what it was asked to measure."""

    def __init__(self, dirpath: str, cache_dir: str | None = None) -> None:
        super().__init__(dirpath, during_fit=False, cache_dir=cache_dir)
        self.measured: list[bool] = []
        self.loads = 0
        self.network = "first"  # stands for the original network's weights

    def _check_module(self, pl_module: pl.LightningModule) -> None:
        pass

    def _check_run(self, trainer: pl.Trainer) -> None:
        pass

    def _load(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.loads += 1

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                 original: bool) -> torch.Tensor:
        self.measured.append(original)
        share = torch.zeros(4)
        share[trainer.global_rank::trainer.world_size] = 1.0 if original else 3.0
        return self._gather(trainer, pl_module.device, share)[0]

    def _compare(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                 original: torch.Tensor, unlearned: torch.Tensor) -> tuple[dict, dict]:
        return ({"gap": float((unlearned - original).mean()),
                 **u_fid_metrics("u_fid/x/ddim2", 4.0, 2.0)},
                {"original": original.tolist()})

    def _write_pictures(self, trainer: pl.Trainer, out: Path, results: dict,
                        original: torch.Tensor, unlearned: torch.Tensor) -> None:
        self.write_side_by_side(trainer, torch.zeros(3, 4, 4), torch.ones(3, 4, 4), out, "")

    def _original_digest(self, pl_module: pl.LightningModule) -> str:
        return self.network

    def _original_key(self, pl_module: pl.LightningModule) -> str:
        return OriginalCache.key(network=self.network)

    def _to_entry(self, results: torch.Tensor) -> dict:
        return {"samples": results}

    def _from_entry(self, entry: dict) -> torch.Tensor:
        return entry["samples"]


def test_the_base_measures_the_original_once_and_writes_logs_and_caches(
        tmp_path: Path) -> None:
    callback, module = ConstantEvaluation("out", cache_dir="cache"), BoringModel()
    trainer = _trainer(callbacks=[callback])
    trainer.validate(module)
    written = json.loads((tmp_path / "out" / "evaluation_step_0000000.json").read_text())
    assert list(written) == ["step", "stage", "metrics", "original"]
    assert (written["step"], written["stage"], written["original"]) == (0, "validate", [1.0] * 4)
    assert written["metrics"] == {"gap": 2.0, "u_fid/x/ddim2": 2.0,
                                  "original/u_fid/x/ddim2": 4.0, "u_fid_ratio": 0.5}
    assert trainer.callback_metrics["eval/gap"] == 2.0
    assert callback.picture == Path("out") / "samples_step_0000000.png"
    assert Image.open(callback.picture).size == (4 + 8 + 4, 4)  # left, gap, right
    assert callback.results["metrics"] == written["metrics"]

    # The same module again: nothing reloaded, the original's results kept in memory.
    _trainer(callbacks=[callback]).validate(module)
    assert callback.measured == [True, False, False] and callback.loads == 1
    # Its network changed: measured anew (and stored under the new key).
    callback.network = "second"
    _trainer(callbacks=[callback]).validate(module)
    assert callback.measured == [True, False, False, True, False]
    assert len(list((tmp_path / "cache").glob("original-*.pt"))) == 2
    # Another callback on the same cache reads the original's results from disk.
    again = ConstantEvaluation("again", cache_dir="cache")
    _trainer(callbacks=[again]).validate(BoringModel())
    assert again.measured == [False] and again.results["original"] == [1.0] * 4


def test_the_u_fid_ratio_is_undefined_without_a_positive_original() -> None:
    assert u_fid_metrics("u_fid/x", 2.0, 3.0)["u_fid_ratio"] == 1.5
    assert np.isnan(u_fid_metrics("u_fid/x", 0.0, 3.0)["u_fid_ratio"])
