"""A killed unlearning job resumes with ``--ckpt_path last`` and ends where an uninterrupted
run with the same seed ends: same weights, same prior (restored from the checkpoint)."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
import torch

from unlearning_runs import run_vdu, subprocess_env, tiny_job, vdu_command, wait_for_step
from vdu_lightning.checkpoints import read_unet_weights
from vdu_lightning.files import load_checkpoint

pytestmark = pytest.mark.timeout(300)
MAX_STEPS = 14  # 4 batches an epoch: the job crosses epochs and is killed inside one


def test_a_killed_job_resumes_from_last_and_matches_an_uninterrupted_run(
        tmp_path: Path) -> None:
    checkpoints = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                   "init_args": {"dirpath": "checkpoints", "save_last": True,
                                 "every_n_train_steps": 1}}
    export = {"class_path": "vdu_lightning.callbacks.ExportPretrained",
              "init_args": {"dirpath": "unlearned"}}
    config = tiny_job(tmp_path, max_steps=MAX_STEPS, callbacks=[checkpoints, export])
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    killed.mkdir(), whole.mkdir()

    # Slowed down (results do not depend on it) so that the kill lands part-way.
    slow = "--trainer.callbacks+=probes.SlowSteps"
    job = subprocess.Popen(vdu_command("fit", "--config", str(config), slow),
                           cwd=killed, env=subprocess_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        killed_at = wait_for_step(killed / "checkpoints" / "last.ckpt", job, least=5)
        job.send_signal(signal.SIGKILL)
        job.wait(timeout=30)
    finally:
        job.kill()
    assert job.returncode == -signal.SIGKILL
    assert killed_at < MAX_STEPS and not (killed / "unlearned").exists()

    # The prior file is gone: the resumed job can only take the prior from the checkpoint.
    prior_file = tmp_path / "prior.safetensors"
    prior_bytes = prior_file.read_bytes()
    prior_file.unlink()
    run_vdu("fit", "--config", str(config), "--ckpt_path", "last", cwd=killed)
    prior_file.write_bytes(prior_bytes)
    run_vdu("fit", "--config", str(config), cwd=whole)

    resumed = load_checkpoint(killed / "checkpoints" / "last.ckpt")
    uninterrupted = load_checkpoint(whole / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == uninterrupted["global_step"] == MAX_STEPS
    for name, value in uninterrupted["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][name], value, rtol=1e-6, atol=1e-7,
                                   msg=lambda m, name=name: f"{name}: {m}")
    pretrained = read_unet_weights(tmp_path / "ddpm")
    assert not torch.equal(resumed["state_dict"]["unet.conv_in.weight"],
                           pretrained["conv_in.weight"])  # the job did unlearn
    for name in uninterrupted["vdu_prior"]["var"]:
        assert torch.equal(resumed["vdu_prior"]["var"][name],
                           uninterrupted["vdu_prior"]["var"][name])
