"""A two-process DDP job killed with SIGKILL resumes with ``--ckpt_path last`` (each rank takes
its own noise stream back from the checkpoint) and ends with the weights of an uninterrupted
two-process run with the same seed."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from unlearning_runs import run_vdu, subprocess_env, tiny_job, vdu_command, wait_for_step
from vdu_lightning.files import load_checkpoint

pytestmark = pytest.mark.timeout(400)
MAX_STEPS = 8  # 2 batches an epoch per rank: the job crosses epochs and is killed inside one
DDP = ("--trainer.strategy=ddp", "--trainer.devices=2")


#: VDU's options that keep per-step state or read the original network on every rank: the
#: hinge (a frozen original per process), the prior preconditioner (its scales, cached), the
#: centred residual and a timestep band (drawn from each rank's noise stream).
OPTIONS = ("--model.init_args.optimizer=sgd", "--model.init_args.preconditioner=prior",
           "--model.init_args.hinge_factor=2", "--model.init_args.residual=centred",
           "--model.init_args.forget_timesteps=[10,90]")


@pytest.mark.parametrize("options", [(), OPTIONS], ids=["method", "options"])
def test_a_killed_two_process_job_resumes_and_matches_an_uninterrupted_run(
        tmp_path: Path, options: tuple[str, ...]) -> None:
    checkpoints = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                   "init_args": {"dirpath": "checkpoints", "save_last": True,
                                 "every_n_train_steps": 1}}
    config = tiny_job(tmp_path, max_steps=MAX_STEPS, callbacks=[checkpoints])
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    killed.mkdir(), whole.mkdir()

    # Its own session, so that one SIGKILL reaches both ranks at once (as a scheduler kills
    # a job); slowed down (results do not depend on it) so that the kill lands part-way.
    job = subprocess.Popen(vdu_command("fit", "--config", str(config), *DDP, *options,
                                       "--trainer.callbacks+=probes.SlowSteps"),
                           cwd=killed, env=subprocess_env(), start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        killed_at = wait_for_step(killed / "checkpoints" / "last.ckpt", job, least=3)
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(timeout=30)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == -signal.SIGKILL and killed_at < MAX_STEPS

    run_vdu("fit", "--config", str(config), *DDP, *options, "--ckpt_path", "last", cwd=killed)
    run_vdu("fit", "--config", str(config), *DDP, *options, cwd=whole)

    resumed = load_checkpoint(killed / "checkpoints" / "last.ckpt")
    uninterrupted = load_checkpoint(whole / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == uninterrupted["global_step"] == MAX_STEPS
    assert resumed["noise_generator_states"].shape[0] == 2
    for name, value in uninterrupted["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][name], value, rtol=1e-6, atol=1e-7,
                                   msg=lambda m, name=name: f"{name}: {m}")
    # The options reached the module (and its checkpoint), not only the command line.
    expected = {"optimizer": "sgd", "preconditioner": "prior", "hinge_factor": 2.0,
                "residual": "centred", "forget_timesteps": [10, 90]} if options else {
                    "preconditioner": "none", "hinge_factor": None}
    for key, value in expected.items():
        stored = resumed["hyper_parameters"][key]
        assert (list(stored) if isinstance(stored, tuple) else stored) == value, key
