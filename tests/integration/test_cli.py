"""The ``vdu`` command: fits from the shipped configs, and every config in configs/ loads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline

from conftest import CONFIGS, REPO
from vdu_lightning import (
    ClassifierModule,
    DiffusionModule,
    ParameterPrior,
    UnlearningModule,
)
from vdu_lightning.cli import VDUCLI, main
from vdu_lightning.modules.compat import check_data_fits_model
from vdu_lightning.methods.sfd import OneStepGeneratorPipeline

TINY_PRETRAIN = str(CONFIGS / "tests" / "tiny_pretrain.yaml")
TINY_VDU = str(CONFIGS / "tests" / "tiny_vdu.yaml")
#: Configs that are complete jobs; the others (trainer/, logger/) are presets layered on one.
#: sd/ and cifar10/ run with tiny stand-ins of their models in test_text_to_image.py and
#: test_cifar10_configs.py.
JOB_CONFIGS = sorted(p for p in CONFIGS.rglob("*.yaml")
                     if p.parent.name not in ("trainer", "logger", "sd", "cifar10"))
PRESET_CONFIGS = sorted(p for p in CONFIGS.rglob("*.yaml")
                        if p.parent.name in ("trainer", "logger"))


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
    assert clf.net.predict(torch.zeros(3, 1, 8, 8))[0].shape == (3,)


def test_command_line_overrides_win(tmp_path: Path) -> None:
    cli = VDUCLI(args=["--config", TINY_PRETRAIN, "--trainer.max_steps=2",
                       "--model.init_args.lr=0.5"], run=False)
    assert cli.trainer.max_steps == 2
    assert cli.model.hparams.lr == 0.5


def test_prior_finetune_and_vdu_configs_run_end_to_end_and_evaluate(tmp_path: Path,
                                                                    capsys) -> None:
    main(["fit", "--config", str(CONFIGS / "tests" / "tiny_classifier.yaml"),
          "--trainer.max_epochs=1"])
    main(["fit", "--config", TINY_PRETRAIN])
    trajectory = ParameterPrior.load(tmp_path / "runs/tests/tiny_prior.safetensors")
    assert (trajectory.source, trajectory.count) == ("trajectory", 3)
    main(["fit", "--config", str(CONFIGS / "tests" / "tiny_prior_finetune.yaml")])
    finetune = ParameterPrior.load(tmp_path / "runs/tests/tiny_prior_finetune.safetensors")
    assert (finetune.source, finetune.count) == ("finetune", 3)

    main(["fit", "--config", TINY_VDU])
    unlearned = DDPMPipeline.from_pretrained(tmp_path / "runs/tests/tiny_unlearned",
                                             local_files_only=True).unet
    original = DDPMPipeline.from_pretrained(tmp_path / "runs/tests/tiny_ddpm",
                                            local_files_only=True).unet
    assert not torch.equal(unlearned.conv_in.weight, original.conv_in.weight)
    checkpoint = str(tmp_path / "runs/tests/tiny_vdu/last.ckpt")

    # The evaluation path: PUL, u-FID, histograms and the side-by-side grid.
    main(["validate", "--config", TINY_VDU, "--ckpt_path", checkpoint])
    results = sorted((tmp_path / "runs/tests/tiny_vdu").rglob("evaluation_step_*.json"))
    assert len(results) == 1
    assert sorted((results[0].parent).glob("samples_step_*.png"))

    # Resume: the prior comes from the checkpoint, not from the (now deleted) prior file.
    (tmp_path / "runs/tests/tiny_prior.safetensors").unlink()
    cli = VDUCLI(args=["fit", "--config", TINY_VDU, "--ckpt_path", checkpoint,
                       "--trainer.max_steps=6"])
    assert cli.trainer.global_step == 6
    assert cli.model.prior.names == trajectory.names

    unlearned = DDPMPipeline.from_pretrained(tmp_path / "runs/tests/tiny_unlearned",
                                             local_files_only=True).unet  # re-exported
    main(["prior", "--checkpoints", str(tmp_path / "runs/tests/tiny_ddpm"),
          str(tmp_path / "runs/tests/tiny_unlearned"), "--out", "cli_prior.safetensors",
          "--source", "independent"])
    printed = capsys.readouterr().out
    assert "wrote cli_prior.safetensors: prior: K=2 independent checkpoints" in printed
    built = ParameterPrior.load(tmp_path / "cli_prior.safetensors")
    expected = (unlearned.conv_in.weight.double() - original.conv_in.weight.double()) ** 2 / 2
    torch.testing.assert_close(built.var["conv_in.weight"].double(),
                               expected.float().clamp_min(built.min_var).double())


def test_the_prior_command_names_missing_checkpoints(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["prior", "--checkpoints", "missing_a.ckpt", "missing_b", "--out", "p.safetensors"])
    assert exit_info.value.code == 2
    assert "checkpoints not found: ['missing_a.ckpt', 'missing_b']" in capsys.readouterr().err
    assert not Path("p.safetensors").exists()


@pytest.fixture
def stand_in_models(tmp_path: Path) -> None:
    """The pre-trained models the unlearning configs start from, untrained, at their paths."""
    for config, path in ((CONFIGS / "mnist5k" / "pretrain.yaml", "runs/mnist5k/ddpm"),
                         (CONFIGS / "mnist5k" / "pretrain_conditional.yaml",
                          "runs/mnist5k/ddpm_conditional"),
                         (Path(TINY_PRETRAIN), "runs/tests/tiny_ddpm")):
        VDUCLI(args=["--config", str(config)], run=False).model.save_pretrained(tmp_path / path)
    VDUCLI(args=["--config", str(CONFIGS / "mnist5k" / "classifier.yaml")],
           run=False).model.save_pretrained(tmp_path / "runs/mnist5k/classifier")


PEER_CONFIGS = ["gradient_ascent", "anchor", "ewc", "salun", "retain_finetune"]
#: Small enough for a test: EWC's Fisher and replay set on a handful of samples.
PEER_OVERRIDES = {"ewc": ["--model.init_args.fisher_samples=2",
                          "--model.init_args.fisher_timesteps=3",
                          "--model.init_args.replay_samples=8",
                          "--model.init_args.sample_steps=2"]}


@pytest.mark.parametrize("method", PEER_CONFIGS)
def test_every_peer_config_runs_a_few_steps_and_changes_the_model(
        method: str, tmp_path: Path, stand_in_models: None) -> None:
    main(["fit", "--config", str(CONFIGS / "mnist5k" / f"{method}.yaml"),
          "--trainer.max_steps=2", "--trainer.accelerator=cpu",
          "--trainer.enable_progress_bar=false"] + PEER_OVERRIDES.get(method, []))
    original = DDPMPipeline.from_pretrained(tmp_path / "runs/mnist5k/ddpm",
                                            local_files_only=True).unet
    unlearned = DDPMPipeline.from_pretrained(tmp_path / f"runs/mnist5k/{method}_forget1",
                                             local_files_only=True).unet
    changed = [name for name, p in unlearned.named_parameters()
               if not torch.equal(p, original.get_parameter(name))]
    assert changed


@pytest.mark.parametrize("method", ["sfd", "sid"])
def test_the_distillation_configs_train_and_export_a_one_step_generator(
        method: str, tmp_path: Path, stand_in_models: None) -> None:
    main(["fit", "--config", str(CONFIGS / "mnist5k" / f"{method}.yaml"),
          "--trainer.max_steps=4", "--trainer.accelerator=cpu", "--model.batch_size=4",
          "--trainer.enable_progress_bar=false"])
    teacher = DDPMPipeline.from_pretrained(tmp_path / "runs/mnist5k/ddpm_conditional",
                                           local_files_only=True).unet
    exported = OneStepGeneratorPipeline.from_pretrained(
        tmp_path / f"runs/mnist5k/{method}_generator")
    changed = [name for name, p in exported.unet.named_parameters()
               if not torch.equal(p, teacher.get_parameter(name))]
    assert changed
    images = exported([0, 1], generator=torch.Generator().manual_seed(0), output_type="pt")
    assert images.images.shape == (2, 1, 16, 16)


@pytest.mark.parametrize("config", JOB_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_job_config_instantiates(config: Path, stand_in_models: None) -> None:
    cli = VDUCLI(args=["--config", str(config)], run=False)
    if cli.datamodule is None:  # a module with loaders of its own (SFD reads labels only)
        assert next(iter(cli.model.train_dataloader())) is not None
        classifier = cli.model.override_classifier()
        if classifier is not None:  # its own configuration, not the SFD module's
            assert "teacher" not in classifier.config and classifier.num_classes == 10
        return
    # The data fit the model: the shape check fit() would run, done here without training.
    if isinstance(cli.model, (DiffusionModule, UnlearningModule)):
        check_data_fits_model(cli.datamodule, cli.model.sample_shape, "the UNet")
    else:
        assert cli.model.hparams.in_channels == cli.datamodule.channels
    cli.datamodule.setup("fit")
    batch = next(iter(cli.datamodule.train_dataloader()))
    if isinstance(batch, tuple):  # a CombinedLoader (forget + retain) yields (batch, idx, idx)
        assert batch[0]["retain"]["image"].shape == batch[0]["forget"]["image"].shape
        batch = batch[0]["forget"]
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
          "--config", str(CONFIGS / "logger" / "csv.yaml"), "--trainer.max_steps=4",
          "--trainer.limit_val_batches=1"])
    module = DiffusionModule.from_pretrained(tmp_path / "runs/tests/tiny_ddpm", sample_steps=2)
    assert all(torch.isfinite(p).all() for p in module.unet.parameters())
    assert torch.isfinite(module.sample(2, seed=0)).all()
    header = (tmp_path / "logs/csv/version_0/metrics.csv").read_text().splitlines()[0]
    assert "train/loss" in header.split(",")
