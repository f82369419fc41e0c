"""``--ckpt_path`` restores the state of the model the config names, and nothing more: a
checkpoint of another class is refused before any work, a module a checkpoint names is never
imported, and ``--ckpt_path last`` also serves the first run of a job (nothing to resume)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import CONFIGS
from unlearning_runs import subprocess_env, tiny_job, vdu_command
from vdu_lightning.cli import VDUCLI, main
from vdu_lightning.files import load_checkpoint
from vdu_lightning.resume import find_last_checkpoint

CHECKPOINTS = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
               "init_args": {"dirpath": "checkpoints", "save_last": True}}
EXPORT = {"class_path": "vdu_lightning.callbacks.ExportPretrained",
          "init_args": {"dirpath": "unlearned"}}


def files_under(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_checkpoint_of_another_class_is_refused_and_the_export_is_kept(
        tmp_path: Path) -> None:
    job = tiny_job(tmp_path, max_steps=2, callbacks=[CHECKPOINTS, EXPORT])
    main(["fit", "--config", str(job)])
    exported = files_under(tmp_path / "unlearned")
    # A real DiffusionModule checkpoint, as `vdu fit` of a pre-training config writes it.
    pretrain = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"dirpath": "pretrain", "save_last": True}}
    main(["fit", "--config", str(CONFIGS / "tests" / "tiny_pretrain.yaml"),
          "--trainer.max_steps=1", "--trainer.logger=false", "--trainer.limit_val_batches=0",
          "--trainer.callbacks=" + json.dumps([pretrain])])
    diffusion = tmp_path / "pretrain" / "last.ckpt"
    assert load_checkpoint(diffusion)["hyper_parameters"]["_class_path"] == (
        "vdu_lightning.DiffusionModule")

    with pytest.raises(ValueError, match=(
            rf"^ckpt_path: {diffusion} was written by vdu_lightning\.DiffusionModule, and this "
            r"run's model is vdu_lightning\.VDUModule: a checkpoint restores the state of the "
            r"class the config names, it never chooses the class")):
        main(["fit", "--config", str(job), "--ckpt_path", str(diffusion)])
    assert files_under(tmp_path / "unlearned") == exported


def test_a_module_named_by_a_checkpoint_is_never_imported(tmp_path: Path) -> None:
    job = tiny_job(tmp_path, max_steps=2, callbacks=[CHECKPOINTS])
    main(["fit", "--config", str(job)])
    # A checkpoint shipped with a helper.py, and naming it as its class, run where both lie
    # (`python -m` puts the working directory first on sys.path).
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    (shipped / "helper.py").write_text("open('imported', 'w').close()\n")
    content = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    content["hyper_parameters"]["_class_path"] = "helper.Unlearner"
    torch.save(content, shipped / "model.ckpt")

    done = subprocess.run(vdu_command("fit", "--config", str(job), "--ckpt_path",
                                      "model.ckpt"),
                          cwd=shipped, env=subprocess_env(), capture_output=True, text=True,
                          timeout=240)
    assert not (shipped / "imported").exists(), "the checkpoint's module was imported"
    assert done.returncode != 0
    assert ("ValueError: ckpt_path: model.ckpt was written by helper.Unlearner, and this "
            "run's model is vdu_lightning.VDUModule") in done.stderr


def test_ckpt_path_last_starts_a_first_run_and_resumes_the_next(tmp_path: Path) -> None:
    job = tiny_job(tmp_path, max_steps=2, callbacks=[CHECKPOINTS])
    main(["fit", "--config", str(job), "--ckpt_path", "last"])  # nothing to resume yet
    first = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert first["global_step"] == 2 and "vdu_prior" in first

    # The prior file is gone: the second run can only take the prior from last.ckpt.
    (tmp_path / "prior.safetensors").unlink()
    main(["fit", "--config", str(job), "--ckpt_path", "last", "--trainer.max_steps=4"])
    assert load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 4


def test_the_config_and_not_the_checkpoint_gives_the_model_its_arguments(
        tmp_path: Path) -> None:
    """A checkpoint of the right class whose hyperparameters say otherwise (another gamma,
    another pretrained model) restores state only: the run keeps the config's arguments."""
    job = tiny_job(tmp_path, max_steps=2, callbacks=[CHECKPOINTS])
    main(["fit", "--config", str(job)])
    content = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    content["hyper_parameters"].update(gamma=0.9, pretrained=str(tmp_path / "elsewhere"))
    torch.save(content, tmp_path / "edited.ckpt")
    cli = VDUCLI(args=["fit", "--config", str(job), "--trainer.max_steps=3",
                       "--ckpt_path", str(tmp_path / "edited.ckpt")])
    assert cli.model.gamma == 0.5 and cli.model.pretrained == str(tmp_path / "ddpm")
    assert cli.trainer.global_step == 3


def test_the_hpc_checkpoint_lightning_would_take_is_checked_first(tmp_path: Path) -> None:
    job = tiny_job(tmp_path, max_steps=2, callbacks=[CHECKPOINTS],
                   trainer={"default_root_dir": str(tmp_path / "root")})
    main(["fit", "--config", str(job)])
    root = tmp_path / "root"
    (root / "hpc_ckpt_1.ckpt").write_bytes((tmp_path / "checkpoints" / "last.ckpt").read_bytes())
    (root / "hpc_ckpt_12.ckpt").write_bytes(b"truncated")  # the newest: the one resumed
    with pytest.raises(ValueError, match=r"^ckpt_path: .*hpc_ckpt_12\.ckpt"):
        main(["fit", "--config", str(job), "--ckpt_path", "hpc"])


def test_last_in_a_remote_folder_is_left_to_lightning() -> None:
    """Only fsspec can list s3://...: the run must not start afresh (and overwrite it)."""
    trainer = {"callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                              "init_args": {"dirpath": "s3://bucket/run", "save_last": True}}]}
    assert find_last_checkpoint(trainer) == "last"
    local = {"callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                            "init_args": {"dirpath": "nowhere", "save_last": True}}],
             "logger": False}
    assert find_last_checkpoint(local) is None
    with pytest.warns(UserWarning, match="no ModelCheckpoint of this config has save_last"):
        find_last_checkpoint({"callbacks": [
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"dirpath": "nowhere"}}]})
