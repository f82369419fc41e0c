"""``vdu demo --quick``: every file of the report, sane contents, and the cache reused."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import yaml
from diffusers import DDIMPipeline
from PIL import Image

from conftest import CONFIGS, TINY_UNET
from vdu_lightning import VDUModule, demo
from vdu_lightning.cli import main
from vdu_lightning.demo import EVALUATORS, FULL, QUICK


def test_the_quick_demo_writes_the_report_and_a_second_run_reuses_the_cache(
        tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    original_draws = []
    sample_from = VDUModule.sample_from

    def counting(self: VDUModule, noise: torch.Tensor, original: bool = False,
                 **kwargs: object) -> torch.Tensor:
        original_draws.append(original)
        return sample_from(self, noise, original=original, **kwargs)

    monkeypatch.setattr(VDUModule, "sample_from", counting)
    out, cache = tmp_path / "out", tmp_path / "cache"
    main(["demo", "--quick", "--output", str(out), "--cache-dir", str(cache),
          "--forget-class", "3", "--accelerator", "cpu"])
    first = capsys.readouterr().out
    assert "[1/4] pre-train the DDPM and collect the prior: 40 steps" in first
    assert "[2/4] train the evaluation classifiers: held-out accuracy" in first
    assert "(vgg)" in first and "(lenet)" in first

    for name in ("before_after.png", "histogram.png"):
        with Image.open(out / name) as image:
            image.load()
            assert min(image.size) > 16
    with Image.open(out / "before_after.png") as grid:
        # 32 samples per side, each enlarged to 64 pixels and captioned: wider than 2 × 6 tiles.
        assert grid.size[0] > 2 * 6 * 64 and grid.size[1] > 6 * 64
    report = json.loads((out / "metrics.json").read_text())
    evaluation = report["evaluation"]
    assert report["forget_class"] == 3 and evaluation["forget_classes"] == [3]
    metrics = evaluation["metrics"]
    # PUL is undefined (NaN) only when the original made no sample of the digit.
    if evaluation["histograms"]["original"][3] == 0:
        assert math.isnan(metrics["pul"])
    else:
        assert -math.inf < metrics["pul"] <= 100.0
    fid = evaluation["fid_name"]
    assert metrics[fid] > 0 and metrics["original/" + fid] > 0
    for model in ("original", "unlearned"):
        assert sum(evaluation["histograms"][model]) == evaluation["num_samples"] == 64
    assert 0.0 <= metrics["forget_fraction_unlearned"] <= 1.0
    # Both evaluators and the measures that need no classifier.
    assert list(evaluation["paired"]["evaluators"]) == ["classifier", "second_classifier"]
    puls = [metrics["pul"], metrics["second_classifier/pul"]]
    # The gap is reported when both PULs are defined (the original drew the digit for both).
    assert ("pul_disagreement" in metrics) == all(math.isfinite(p) for p in puls)
    likelihood = evaluation["likelihood"]
    assert likelihood["forget"]["images"] == 50 and likelihood["retain"]["images"] == 450
    for key in ("likelihood/forget_bpd_increase", "likelihood/retain_bpd_increase",
                "sample_change/retained", "intensity/background_shift"):
        assert math.isfinite(metrics[key]), key
    text = (out / "report.md").read_text()
    assert "![before and after](before_after.png)" in text and "u-FID" in text
    assert "digit 3" in text
    assert "## Metrics by two evaluators" in text and "## Measures that need no classifier" in text
    assert str(Path(evaluation["second_classifier"])) in text
    assert "bits/dim" in text and "same-seed pixel change" in text

    card = (out / "model" / "README.md").read_text()  # the exported model's card
    assert "to forget class(es) [3] of the data set `mnist5k`" in card
    pul = "undefined" if math.isnan(metrics["pul"]) else format(metrics["pul"], ".4g")
    assert f"| pul | {pul} |" in card
    assert (out / "model" / "before_after.png").read_bytes() == \
        (out / "before_after.png").read_bytes()
    pipeline = DDIMPipeline.from_pretrained(out / "model", local_files_only=True)
    images = pipeline(batch_size=2, num_inference_steps=2, output_type="np",
                      generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 8, 8, 1)

    assert True in original_draws
    original_draws.clear()
    main(["demo", "--quick", "--output", str(out), "--cache-dir", str(cache),
          "--forget-class", "3", "--accelerator", "cpu"])
    second = capsys.readouterr().out
    assert original_draws and True not in original_draws  # only the unlearned model sampled
    assert "[1/4] pre-train the DDPM and collect the prior: cached in" in second
    assert "[2/4] train the evaluation classifiers: cached in" in second
    # The original model's samples came from the cache: the same report, the same numbers.
    assert list((cache / "evaluation").glob("original-*.pt"))
    again = json.loads((out / "metrics.json").read_text())["evaluation"]["metrics"]
    assert again == pytest.approx(metrics, nan_ok=True)


def test_a_bad_forget_class_is_refused_before_any_work(tmp_path: Path, capsys) -> None:
    try:
        main(["demo", "--quick", "--forget-class", "12", "--output", str(tmp_path / "o"),
              "--cache-dir", str(tmp_path / "c")])
    except SystemExit as exit_info:
        assert exit_info.code == 2
    assert "--forget-class must be a digit 0-9, got 12" in capsys.readouterr().err
    assert not (tmp_path / "c").exists() and not (tmp_path / "o").exists()


def test_the_full_budget_is_the_one_of_the_mnist5k_configs() -> None:
    pretrain = yaml.safe_load((CONFIGS / "mnist5k" / "pretrain.yaml").read_text())
    model = pretrain["model"]["init_args"]
    assert FULL.unet == model["unet"]
    assert (FULL.pretrain_steps, FULL.pretrain_lr, FULL.warmup_steps, FULL.ema_decay) == (
        pretrain["trainer"]["max_steps"], model["lr"], model["warmup_steps"],
        model["ema_decay"])
    assert FULL.pretrain_batch_size == pretrain["data"]["init_args"]["batch_size"]
    snapshot = next(c["init_args"] for c in pretrain["trainer"]["callbacks"]
                    if c["class_path"].endswith("PriorSnapshot"))
    assert (FULL.snapshot_every, FULL.snapshot_start) == (snapshot["every_n_steps"],
                                                          snapshot["start_step"])
    for name, config in (("classifier", "classifier.yaml"),
                         ("second_classifier", "classifier_lenet.yaml")):
        classifier = yaml.safe_load((CONFIGS / "mnist5k" / config).read_text())
        architecture, seed, lr = EVALUATORS[name]
        epochs = FULL.classifier_epochs if name == "classifier" else \
            FULL.second_classifier_epochs
        assert (architecture, seed, lr, epochs) == (
            classifier["model"]["init_args"]["architecture"], classifier["seed_everything"],
            classifier["model"]["init_args"]["lr"], classifier["trainer"]["max_epochs"])
    vdu = yaml.safe_load((CONFIGS / "mnist5k" / "vdu.yaml").read_text())
    assert (FULL.gamma, FULL.lr, FULL.unlearn_steps) == (
        vdu["model"]["init_args"]["gamma"], vdu["model"]["init_args"]["lr"],
        vdu["trainer"]["max_steps"])


def _config(name: str) -> dict[str, Any]:
    return yaml.safe_load((CONFIGS / "mnist5k" / name).read_text())


def _callback(config: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c.get("init_args", {}) for c in config["trainer"]["callbacks"]
                if c["class_path"].endswith("." + name))


class _Stop(Exception):
    pass


def test_the_demo_builds_every_run_from_its_config_changed_only_where_it_says(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # What each stage builds, recorded instead of trained: exactly the configs' init args and
    # budgets, but for the demo's own paths and digit and its shorter evaluation.
    built: dict[str, list[Any]] = {}

    def recorder(name: str, made: Any = None) -> Any:
        def build(*args: Any, **kwargs: Any) -> Any:
            built.setdefault(name, []).append(kwargs if not args else (args, kwargs))
            return SimpleNamespace() if made is None else made
        return build

    class Trainer:
        def __init__(self, callbacks: list[Any], **kwargs: Any) -> None:
            built.setdefault("Trainer", []).append(kwargs)
            self.callback_metrics = {"val/acc": 0.5}

        def fit(self, module: Any, datamodule: Any) -> None:
            pass

        def validate(self, *args: Any, **kwargs: Any) -> None:
            raise _Stop  # the evaluation's settings are recorded: nothing to sample

    monkeypatch.setattr(demo.Demo, "_trainer",
                        lambda self, callbacks, **kwargs: Trainer(callbacks, **kwargs))
    monkeypatch.setattr(demo.pl, "seed_everything", recorder("seed_everything"))
    monkeypatch.setattr(demo, "ParameterPrior", SimpleNamespace(
        load=lambda path: SimpleNamespace(describe=lambda: "a prior")))
    for name in ("DiffusionModule", "ClassifierModule", "ImageDataModule", "PriorSnapshot",
                 "ExportPretrained", "CheckpointPrior", "UnlearningGuard",
                 "UnlearningEvaluation"):
        monkeypatch.setattr(demo, name, recorder(name))
    monkeypatch.setattr(demo, "ForgetSetDataModule", recorder(
        "ForgetSetDataModule", SimpleNamespace(forget_set=[0] * 500)))
    monkeypatch.setattr(demo, "VDUModule", recorder(
        "VDUModule", SimpleNamespace(loss_terms={"stability": 1.0, "plasticity": 2.0})))
    run = demo.Demo(FULL, 7, tmp_path / "out", tmp_path / "cache")
    run.pretrain()
    run.classifier()
    run.unlearn()
    with pytest.raises(_Stop):
        run.evaluate()

    pretrain, vdu = _config("pretrain.yaml"), _config("vdu.yaml")
    classifiers = [_config("classifier.yaml"), _config("classifier_lenet.yaml")]
    assert built["DiffusionModule"] == [pretrain["model"]["init_args"]]
    assert built["ClassifierModule"] == [c["model"]["init_args"] for c in classifiers]
    assert built["ImageDataModule"] == [c["data"]["init_args"] for c in [pretrain, *classifiers]]
    assert built["PriorSnapshot"] == [_callback(pretrain, "PriorSnapshot")
                                      | {"path": str(run.prior_path)}]
    assert built["Trainer"] == [
        {"max_steps": pretrain["trainer"]["max_steps"], "limit_val_batches": 0},
        *({"max_epochs": c["trainer"]["max_epochs"]} for c in classifiers),
        {"max_steps": vdu["trainer"]["max_steps"], "limit_val_batches": 0},
        {},  # the evaluation's
    ]
    assert built["seed_everything"] == [((c["seed_everything"],), {"verbose": False})
                                        for c in [pretrain, *classifiers, vdu]]
    # Evaluation with DDIM-25 on 500 samples per model, not vdu.yaml's DDIM-50 on 1,000.
    assert built["VDUModule"] == [vdu["model"]["init_args"]
                                  | {"pretrained": str(run.model_dir), "sample_steps": 25}]
    assert built["ForgetSetDataModule"] == [vdu["data"]["init_args"] | {"forget_classes": [7]}]
    assert built["UnlearningGuard"] == [_callback(vdu, "UnlearningGuard")]
    evaluation = built["UnlearningEvaluation"][0]
    assert Path(evaluation.pop("dirpath")).parent == tmp_path / "out"
    assert evaluation == _callback(vdu, "UnlearningEvaluation") | {
        "classifier": str(run.classifier_dirs["classifier"]),
        "second_classifier": str(run.classifier_dirs["second_classifier"]),
        "num_samples": 500, "num_steps": 25, "seed": vdu["seed_everything"],
        "cache_dir": str(tmp_path / "cache" / "evaluation")}


def test_the_quick_budget_trains_the_tiny_unet_of_the_test_configs() -> None:
    assert QUICK.unet == TINY_UNET and QUICK.image_size == TINY_UNET["sample_size"]
    assert {name: QUICK.runs[name].init_args["data"]["image_size"] for name in demo.RUNS} == \
        dict.fromkeys(demo.RUNS, TINY_UNET["sample_size"])


def test_without_its_configs_the_demo_says_where_it_looked(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--quick", "--configs", str(tmp_path / "nowhere"), "--output",
              str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c")])
    assert exit_info.value.code == 2
    missing = tmp_path / "nowhere" / "mnist5k" / "pretrain.yaml"
    assert f"vdu demo: error: no config mnist5k/pretrain.yaml at {missing}" in \
        capsys.readouterr().err
    assert not (tmp_path / "c").exists() and not (tmp_path / "o").exists()
