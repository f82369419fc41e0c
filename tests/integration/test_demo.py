"""``vdu demo --quick``: every file of the report, sane contents, and the cache reused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import DDIMPipeline
from PIL import Image

from conftest import CONFIGS
from vdu_lightning import VDUModule
from vdu_lightning.cli import main
from vdu_lightning.demo import EVALUATORS, FULL


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
