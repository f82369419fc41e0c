"""The ``vdu`` command: fits from the shipped configs, and every config in configs/ loads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline

from conftest import CONFIGS, REPO
from vdu_lightning import ClassifierModule, DiffusionModule
from vdu_lightning.cli import VDUCLI, main
from vdu_lightning.modules.compat import check_data_fits_model

TINY_PRETRAIN = str(CONFIGS / "tests" / "tiny_pretrain.yaml")
#: Configs that are complete jobs; the others (trainer/, logger/) are presets layered on one.
JOB_CONFIGS = sorted(p for p in CONFIGS.rglob("*.yaml")
                     if p.parent.name not in ("trainer", "logger"))
PRESET_CONFIGS = sorted(p for p in CONFIGS.rglob("*.yaml") if p not in JOB_CONFIGS)


def test_tiny_pretrain_fits_exports_and_logs_samples(tmp_path: Path) -> None:
    cli = VDUCLI(args=["fit", "--config", TINY_PRETRAIN])
    assert cli.config_init["fit"]["weights_only"] is True  # checkpoints never unpickle code
    model_dir = tmp_path / "runs/tests/tiny_ddpm"
    pipeline = DDPMPipeline.from_pretrained(model_dir, local_files_only=True)
    assert pipeline.unet.config.sample_size == 8
    module = DiffusionModule.from_pretrained(model_dir, sample_steps=2)
    assert module.sample(2, seed=0).shape == (2, 1, 8, 8)
    # Grids after step 3 and at the end of fit (step 6), and the resolved config.
    run_dir = tmp_path / "runs/tests/tiny_pretrain/lightning_logs/version_0"
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == [
        "step_0000003.png", "step_0000006.png"]
    assert "class_path: vdu_lightning.DiffusionModule" in (run_dir / "config.yaml").read_text()


def test_tiny_classifier_fits_and_exports(tmp_path: Path) -> None:
    main(["fit", "--config", str(CONFIGS / "tests" / "tiny_classifier.yaml")])
    clf = ClassifierModule.from_pretrained(tmp_path / "runs/tests/tiny_classifier")
    assert clf.predict_labels(torch.zeros(3, 1, 8, 8)).shape == (3,)


def test_command_line_overrides_win(tmp_path: Path) -> None:
    cli = VDUCLI(args=["--config", TINY_PRETRAIN, "--trainer.max_steps=2",
                       "--model.init_args.lr=0.5"], run=False)
    assert cli.trainer.max_steps == 2
    assert cli.model.hparams.lr == 0.5


@pytest.mark.parametrize("config", JOB_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_job_config_instantiates(config: Path) -> None:
    cli = VDUCLI(args=["--config", str(config)], run=False)
    # The data fit the model: the shape check fit() would run, done here without training.
    if isinstance(cli.model, DiffusionModule):
        check_data_fits_model(cli.datamodule, cli.model.sample_shape, "the UNet")
    else:
        assert cli.model.hparams.in_channels == cli.datamodule.channels
    cli.datamodule.setup("fit")
    batch = next(iter(cli.datamodule.train_dataloader()))
    assert cli.model.hparams.get("num_classes") in (None, 10)
    assert batch["image"].shape[1:] == (cli.datamodule.channels,) + (
        cli.datamodule.resolved_image_size,) * 2


@pytest.mark.parametrize("preset", PRESET_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_preset_layers_on_a_job_config(preset: Path, capsys) -> None:
    args = ["--config", TINY_PRETRAIN, "--config", str(preset)]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args, "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    expected = preset.read_text()
    for key in ("precision", "accelerator", "class_path"):
        for line in expected.splitlines():
            if line.strip().startswith(f"{key}:"):
                assert line.split("#")[0].strip() in printed
    if "gpu" in preset.name and not torch.cuda.is_available():
        return  # parsed above; a GPU trainer cannot be built on this machine
    cli = VDUCLI(args=args, run=False)
    assert cli.trainer is not None


def test_print_config_through_the_module_entry_point() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "vdu_lightning", "fit", "--config", TINY_PRETRAIN,
         "--print_config"],
        cwd=REPO, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr
    assert "class_path: vdu_lightning.DiffusionModule" in result.stdout
    assert "class_path: vdu_lightning.ImageDataModule" in result.stdout
    assert "seed_everything: 0" in result.stdout


def test_unknown_config_key_is_refused(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", TINY_PRETRAIN, "--model.init_args.gama=0.5"])
    assert exit_info.value.code != 0
    assert "gama" in capsys.readouterr().err


def test_tiny_pretrain_fits_in_bf16_mixed_with_csv_logs(tmp_path: Path) -> None:
    main(["fit", "--config", TINY_PRETRAIN, "--config", str(CONFIGS / "trainer" / "bf16.yaml"),
          "--config", str(CONFIGS / "logger" / "csv.yaml"), "--trainer.max_steps=2",
          "--trainer.limit_val_batches=1"])
    module = DiffusionModule.from_pretrained(tmp_path / "runs/tests/tiny_ddpm", sample_steps=2)
    assert all(torch.isfinite(p).all() for p in module.unet.parameters())
    assert torch.isfinite(module.sample(2, seed=0)).all()
    header = (tmp_path / "logs/csv/version_0/metrics.csv").read_text().splitlines()[0]
    assert "train/loss" in header.split(",")
