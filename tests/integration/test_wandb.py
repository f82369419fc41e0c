"""A real wandb run in offline mode: metrics, a sample grid and the resolved config (under
a name of its own: ``files/config.yaml`` is W&B's run config)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import wandb
from PIL import Image
from conftest import CONFIGS
from vdu_lightning.cli import VDUCLI, main


def test_offline_wandb_run_holds_sample_grid_and_config(tmp_path: Path) -> None:
    main(["fit", "--config", str(CONFIGS / "tests" / "tiny_pretrain.yaml"),
          "--config", str(CONFIGS / "logger" / "wandb.yaml"),
          f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}"])
    # One process, two runs: a finished run is not reused (a CLI process ends its own).
    wandb.finish()
    runs = list((tmp_path / "logs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    run = runs[0]
    assert list(run.glob("run-*.wandb")), "no W&B event file"
    grids = sorted((run / "files" / "media" / "images").glob("samples_*.png"))
    assert len(grids) == 2, grids  # at step 3 and at the end of fit
    run_id = run.name.rsplit("-", 1)[-1]
    on_disk = sorted((tmp_path / "logs" / "samples" / run_id).glob("step_*.png"))
    assert len(on_disk) == 2, on_disk  # the same grids on disk, in a folder of this run
    for logged, saved in zip(grids, on_disk):  # W&B holds the very pixels (not a black grid)
        logged_pixels = np.asarray(Image.open(logged).convert("RGB"))
        assert np.array_equal(logged_pixels, np.asarray(Image.open(saved).convert("RGB")))
        assert logged_pixels.mean() > 20
    config = (run / "files" / "lightning_config.yaml").read_text()
    assert "class_path: vdu_lightning.DiffusionModule" in config
    assert not (run / "files" / "config.yaml").exists()
    # A second run must not be refused because a config exists (W&B has no versioned log dir).
    main(["fit", "--config", str(CONFIGS / "tests" / "tiny_pretrain.yaml"),
          "--config", str(CONFIGS / "logger" / "wandb.yaml"),
          f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}"])
    wandb.finish()
    assert len(list((tmp_path / "logs" / "wandb").glob("offline-run-*"))) == 2


def test_the_wandb_preset_over_a_csv_logger_keeps_nothing_of_it(tmp_path: Path) -> None:
    cli = VDUCLI(args=["fit", "--config", str(CONFIGS / "tests" / "tiny_pretrain.yaml"),
                       "--config", str(CONFIGS / "logger" / "csv.yaml"),
                       "--config", str(CONFIGS / "logger" / "wandb.yaml"),
                       f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
                       "--trainer.max_steps=1", "--trainer.callbacks=[]"])
    run_name = cli.trainer.logger.experiment.name
    wandb.finish()
    assert run_name != "csv"  # csv.yaml's name, which the W&B run kept before
    assert cli.config["fit"]["trainer"]["logger"]["init_args"]["name"] is None
