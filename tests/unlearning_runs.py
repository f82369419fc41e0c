"""Tiny VDU jobs run through ``vdu fit`` in their own processes (DDP, torchrun, resume tests).

``tiny_job`` writes a pre-trained tiny DDPM, its prior and a job config into a folder;
``vdu_command`` is the command line that runs it, with the ``tests`` folder importable so
that configs can name the callbacks of ``probes.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from conftest import TINY_UNET
from vdu_lightning import DiffusionModule, ParameterPrior
from vdu_lightning.files import load_checkpoint

TESTS = Path(__file__).resolve().parent


def tiny_job(root: Path, max_steps: int = 6, callbacks: list[dict] | None = None,
             trainer: dict[str, Any] | None = None) -> Path:
    """A pre-trained tiny DDPM and its prior under ``root``, and ``root/job.yaml`` that
    unlearns digit 3 from it (paths in the config are absolute: runs may start elsewhere)."""
    torch.manual_seed(0)
    module = DiffusionModule(unet=dict(TINY_UNET), num_train_timesteps=100, sample_steps=2)
    module.save_pretrained(root / "ddpm")
    generator = torch.Generator().manual_seed(1)
    snapshots = [{n: p.detach() + 1e-2 * torch.randn(p.shape, generator=generator)
                  for n, p in module.unet.named_parameters()} for _ in range(3)]
    ParameterPrior.from_tensors(snapshots, "independent").save(root / "prior.safetensors")
    config = {
        "seed_everything": 7,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": max_steps,
            "limit_val_batches": 0, "num_sanity_val_steps": 0, "logger": False,
            "enable_progress_bar": False, "enable_model_summary": False,
            **(trainer or {}),
            "callbacks": [
                {"class_path": "vdu_lightning.callbacks.CheckpointPrior",
                 "init_args": {"prior": str(root / "prior.safetensors")}},
                {"class_path": "vdu_lightning.callbacks.UnlearningGuard"},
                *(callbacks or []),
            ],
        },
        "model": {"class_path": "vdu_lightning.VDUModule",
                  "init_args": {"pretrained": str(root / "ddpm"), "gamma": 0.5, "lr": 1e-3}},
        # 64 items in batches of 16: 4 batches an epoch, so runs cross epochs.
        "data": {"class_path": "vdu_lightning.ForgetSetDataModule",
                 "init_args": {"dataset": "digits", "forget_classes": [3], "forget_size": 64,
                               "eval_size": 16, "batch_size": 16}},
    }
    path = root / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def vdu_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "vdu_lightning", *args]


def subprocess_env() -> dict[str, str]:
    """The test's environment, with ``probes`` importable and one thread per process."""
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def run_vdu(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """``vdu <args>`` in a fresh process; fails the test with its output if it fails."""
    done = subprocess.run(vdu_command(*args), cwd=cwd, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"vdu {' '.join(args)} failed:\n{done.stderr[-4000:]}"
    return done


def wait_for_step(checkpoint: Path, process: subprocess.Popen, least: int) -> int:
    """The step of ``checkpoint`` once it is at least ``least`` (while the job still runs)."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert process.poll() is None, "the job ended before it could be killed"
        if checkpoint.exists():
            step = load_checkpoint(checkpoint)["global_step"]  # files are replaced atomically
            if step >= least:
                return step
        time.sleep(0.05)
    raise TimeoutError(f"{checkpoint} never reached step {least}")
