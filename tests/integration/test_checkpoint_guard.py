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
from vdu_lightning.cli import main
from vdu_lightning.files import load_checkpoint

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
