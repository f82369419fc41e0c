"""The ``vdu`` command: Lightning's CLI over every module and datamodule of the project.

    vdu fit --config configs/mnist5k/pretrain.yaml
    vdu fit --config configs/mnist5k/pretrain.yaml --trainer.max_steps=200
    vdu fit --config configs/mnist5k/pretrain.yaml --config configs/logger/wandb.yaml
    vdu fit --model vdu_lightning.DiffusionModule --print_config
    vdu prior --checkpoints a.ckpt b.ckpt c.ckpt --out prior.safetensors
    vdu demo [--quick] [--forget-class 1] [--output vdu-demo]
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

# Importing the package registers its modules and datamodules, so configs may name them
# by short class name too.
import vdu_lightning  # noqa: F401
from vdu_lightning.callbacks.prior import CheckpointPrior
from vdu_lightning.checkpoints import WEIGHT_PREFIXES
from vdu_lightning.data.datamodules import VDUDataModule
from vdu_lightning.prior import CHECKPOINT_SOURCES, DEFAULT_MIN_VAR, ParameterPrior


class RunConfigSaver(SaveConfigCallback):
    """Saves the resolved config beside the run's logs, also when the logger is W&B.

    ``WandbLogger`` has no versioned log directory, so Lightning's default would write every
    run's ``config.yaml`` into the same folder and refuse the second run. With W&B the config
    goes into the run's own files directory instead, and is uploaded with the run.
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not isinstance(trainer.logger, WandbLogger):
            super().setup(trainer, pl_module, stage)
            return
        if self.already_saved:
            return
        if trainer.is_global_zero:
            # Rank 0 only: the run exists on rank 0 alone; no collective is reached here.
            run_dir = trainer.logger.experiment.dir
            self.parser.save(self.config, os.path.join(run_dir, self.config_filename),
                             skip_none=False, overwrite=True, multifile=self.multifile)
        self.already_saved = True


class VDUCLI(LightningCLI):
    """``LightningCLI`` accepting any LightningModule and ``VDUDataModule`` by class path."""

    def __init__(self, args: list[str] | None = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_callback", RunConfigSaver)
        kwargs.setdefault("parser_kwargs", {"default_env": True})
        super().__init__(
            model_class=pl.LightningModule,
            datamodule_class=VDUDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            run=run,
            **kwargs,
        )

    def before_instantiate_classes(self) -> None:
        # `--ckpt_path` loads with weights_only=True unless the user asks otherwise: a
        # checkpoint must never run pickled code (Lightning leaves it to torch's default,
        # which an environment variable can change, and turns it off for URLs).
        config = self.config.get(self.subcommand) if self.subcommand else None
        if config is not None and "weights_only" in config and config["weights_only"] is None:
            config["weights_only"] = True

    def before_fit(self) -> None:
        # A resumed run restores its prior from the checkpoint; Lightning reads ckpt_path only
        # after the callbacks' setup, so CheckpointPrior is told here not to rebuild it.
        if self.config_init[self.subcommand].get("ckpt_path"):
            for callback in self.trainer.callbacks:
                if isinstance(callback, CheckpointPrior):
                    callback.resuming = True


def prior_command(args: list[str]) -> None:
    """``vdu prior``: build a prior file from K checkpoints and print its summary."""
    parser = argparse.ArgumentParser(
        prog="vdu prior",
        description="Build the checkpoint prior N(mean, diag var) of VDU from K checkpoints "
                    "(DiffusionModule .ckpt files, diffusers directories or UNet state dicts), "
                    "reading one at a time.",
    )
    parser.add_argument("--checkpoints", nargs="+", required=True, help="K >= 2 checkpoints")
    parser.add_argument("--out", required=True, help="the prior file to write (.safetensors)")
    parser.add_argument("--source", choices=CHECKPOINT_SOURCES, default="trajectory",
                        help="how the checkpoints relate (recorded in the file)")
    parser.add_argument("--include", nargs="+", default=None,
                        help="shell-style patterns of parameter names to cover (default: all)")
    parser.add_argument("--min-var", type=float, default=DEFAULT_MIN_VAR,
                        help="floor of the variance")
    parser.add_argument("--weights", choices=sorted(WEIGHT_PREFIXES), default="ema",
                        help="EMA or raw weights of DiffusionModule checkpoints")
    options = parser.parse_args(args)
    try:
        prior = ParameterPrior.from_checkpoints(options.checkpoints, options.source,
                                                options.include, options.min_var,
                                                options.weights)
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"vdu prior: error: {err}\n")
    prior.save(options.out)
    print(f"wrote {options.out}: {prior.describe()}")


def main(args: list[str] | None = None) -> None:
    """Entry point of ``vdu`` and ``python -m vdu_lightning`` (returns None: the console
    script passes the return value to sys.exit)."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["prior"]:
        prior_command(argv[1:])
        return
    if argv[:1] == ["demo"]:
        from vdu_lightning.demo import demo_command  # the demo's imports only when asked for

        demo_command(argv[1:])
        return
    VDUCLI(args=args)


if __name__ == "__main__":
    main()
