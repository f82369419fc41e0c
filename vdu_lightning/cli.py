"""The ``vdu`` command: Lightning's CLI over every module and datamodule of the project.

    vdu fit --config configs/mnist5k/pretrain.yaml
    vdu fit --config configs/mnist5k/pretrain.yaml --trainer.max_steps=200
    vdu fit --config configs/mnist5k/pretrain.yaml --config configs/logger/wandb.yaml
    vdu fit --model vdu_lightning.DiffusionModule --print_config
    vdu prior --checkpoints a.ckpt b.ckpt c.ckpt --out prior.safetensors
    vdu demo [--quick] [--forget-class 1] [--output vdu-demo]
    vdu generate-forget-set --pipeline sd-model --prompt "a painting by X" -n 64 --out forget_x
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_info

import vdu_lightning
import vdu_lightning.callbacks
from typing_extensions import override

from vdu_lightning.callbacks.export import ExportPretrained
from vdu_lightning.callbacks.prior import CheckpointPrior, PriorSnapshot
from vdu_lightning.checkpoints import WEIGHT_PREFIXES
from vdu_lightning.data.datamodules import VDUDataModule
from vdu_lightning.files import atomic_file, check_directory_writable, check_file_writable
from vdu_lightning.modules.compat import check_data_fits_model
from vdu_lightning.prior import (
    CHECKPOINT_SOURCES,
    DEFAULT_MIN_VAR,
    ParameterPrior,
    check_min_var,
)
from vdu_lightning.resume import check_resumable, find_hpc_checkpoint, find_last_checkpoint

# LightningCLI finds a short class name (``--model VDUModule``) among the subclasses imported
# so far, and the package imports its names lazily: import every public class and callback.
for _package in (vdu_lightning, vdu_lightning.callbacks):
    for _name in _package.__all__:
        getattr(_package, _name)


#: The resolved config's name among a W&B run's files, where W&B writes its own run config
#: as config.yaml (and syncs it under that name).
WANDB_CONFIG_FILENAME = "lightning_config.yaml"


class RunConfigSaver(SaveConfigCallback):
    """Saves the resolved config beside the run's logs, also when the logger is W&B.

    ``WandbLogger`` has no versioned log directory, so Lightning's default would write every
    run's ``config.yaml`` into the same folder and refuse the second run. With W&B the config
    goes into the run's own files directory instead, and is uploaded with the run, as
    ``lightning_config.yaml``: ``config.yaml`` there is W&B's own run config.

    A resumed run (``resuming``, set by ``VDUCLI`` for ``--ckpt_path``) may share the log
    directory of the run it continues: that run's config stays, and this one is saved
    beside it as ``config_resumed_<n>.yaml``.
    """

    resuming = False

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not isinstance(trainer.logger, WandbLogger):
            if self.resuming and not self.already_saved:
                # Every rank reaches log_dir and the broadcast; rank 0's file system decides.
                name = self._unused_name(trainer.log_dir)
                self.config_filename = trainer.strategy.broadcast(name)
            super().setup(trainer, pl_module, stage)
            return
        if self.already_saved:
            return
        if trainer.is_global_zero:
            # Rank 0 only: the run exists on rank 0 alone; no collective is reached here.
            run_dir = trainer.logger.experiment.dir
            with atomic_file(os.path.join(run_dir, WANDB_CONFIG_FILENAME)) as tmp:
                self.parser.save(self.config, str(tmp), skip_none=False, overwrite=True,
                                 multifile=self.multifile)
        self.already_saved = True

    def _unused_name(self, log_dir: str | None) -> str:
        stem, suffix = os.path.splitext(self.config_filename)
        name, count = self.config_filename, 0
        while log_dir is not None and os.path.exists(os.path.join(log_dir, name)):
            count += 1
            name = f"{stem}_resumed_{count}{suffix}"
        return name


#: Values of ``--ckpt_path`` left for Lightning to resolve (no file to check beforehand): what
#: remains of them after ``parse_arguments`` resolved what it could (`last` in a remote folder).
_LIGHTNING_CKPT_PATHS = ("best", "hpc", "last", "registry")
#: How jsonargparse reports a class whose ``__init__`` raised (with that error as the cause).
_UNION_ERROR = "Does not validate against any of the Union subtypes"
#: Callbacks that write only while fitting (validate/test may run with them in the config).
_FIT_OUTPUTS = (ModelCheckpoint, ExportPretrained, PriorSnapshot, CheckpointPrior)


def output_directories(trainer: pl.Trainer, fit: bool = True) -> list[tuple[str, str]]:
    """(what, directory) of every place a run writes to that is known before it starts."""
    found: list[tuple[str, Any]] = [("trainer.default_root_dir", trainer.default_root_dir)]
    found += [(f"{type(logger).__name__} save_dir", logger.save_dir)
              for logger in trainer.loggers]
    for callback in trainer.callbacks:
        if not fit and isinstance(callback, _FIT_OUTPUTS):
            continue
        found.append((f"{type(callback).__name__} dirpath", getattr(callback, "dirpath", None)))
    return _local(found)


def output_files(trainer: pl.Trainer, fit: bool = True) -> list[tuple[str, str]]:
    """(what, file) of every file a run writes that is named before it starts."""
    found: list[tuple[str, Any]] = []
    for callback in trainer.callbacks if fit else ():  # both write only while fitting
        if isinstance(callback, PriorSnapshot):
            found.append(("PriorSnapshot path", callback.path))
        if isinstance(callback, CheckpointPrior):
            found.append(("CheckpointPrior save_to", callback.save_to))
    return _local(found)


def _local(found: list[tuple[str, Any]]) -> list[tuple[str, str]]:
    # Remote paths (s3://...) are Lightning's and fsspec's business.
    return [(what, str(path)) for what, path in found if path and "://" not in str(path)]


class VDUCLI(LightningCLI):
    """``LightningCLI`` accepting any LightningModule and ``VDUDataModule`` by class path.

    Bad input is refused with the project's own message before any work starts: a
    ``--ckpt_path`` that is missing, truncated or carries pickled code; a class whose
    arguments are wrong (its error, not jsonargparse's wrapper around it); data that do not
    fit the model; an output directory that cannot be written.
    """

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

    def add_core_arguments_to_parser(self, parser: Any) -> None:
        # As Lightning's, but `data` is optional: a module may bring its own loaders
        # (SFDModule reads no image, only labels).
        parser.add_lightning_class_args(self.trainer_class, "trainer")
        parser.set_defaults({"trainer." + k: v for k, v in self.trainer_defaults.items()
                             if k != "callbacks"})
        parser.add_lightning_class_args(self._model_class, "model", subclass_mode=True)
        parser.add_lightning_class_args(self._datamodule_class, "data", subclass_mode=True,
                                        required=False)

    def parse_arguments(self, parser: Any, args: Any) -> None:
        super().parse_arguments(parser, args)
        # --ckpt_path is checked before anything is read or built (vdu_lightning.resume);
        # `last` becomes the file it names, or nothing when there is none yet (a first run).
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand) if subcommand else None
        ckpt_path = str(config.get("ckpt_path") or "") if config is not None else ""
        try:
            if ckpt_path == "last":
                ckpt_path = find_last_checkpoint(config["trainer"]) or ""
                config["ckpt_path"] = ckpt_path or None
                if not ckpt_path:
                    rank_zero_info("--ckpt_path last: no checkpoint yet, the run starts afresh")
            if ckpt_path == "hpc" or (not ckpt_path and SLURMEnvironment.detect()):
                # Lightning resolves these itself, to the same file: check it beforehand.
                ckpt_path = find_hpc_checkpoint(config["trainer"]) or ""
            if (not ckpt_path or ckpt_path in _LIGHTNING_CKPT_PATHS or "://" in ckpt_path
                    or ckpt_path.startswith("registry:")):
                return
            check_resumable(ckpt_path, config["model"]["class_path"])
        except (FileNotFoundError, ValueError) as err:
            raise type(err)(f"ckpt_path: {err}") from err

    def _parse_ckpt_path(self) -> None:
        # Lightning would take the model's class and arguments from the checkpoint's
        # hyperparameters, importing any module they name: here the config alone says what
        # the model is, and parse_arguments refused a checkpoint of another class.
        return

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
            return
        except ValueError as err:
            error: BaseException = err
        # A class that raised in __init__ comes wrapped in jsonargparse's report on every
        # type it tried (the class, None): give the user the class's own message.
        while (isinstance(error, ValueError) and str(error).startswith(_UNION_ERROR)
               and error.__cause__ is not None):
            error = error.__cause__
        raise error

    def before_instantiate_classes(self) -> None:
        # `--ckpt_path` loads with weights_only=True unless the user asks otherwise: a
        # checkpoint must never run pickled code (Lightning leaves it to torch's default,
        # which an environment variable can change, and turns it off for URLs).
        config = self.config.get(self.subcommand) if self.subcommand else None
        if config is not None and "weights_only" in config and config["weights_only"] is None:
            config["weights_only"] = True

    def _check_before_running(self) -> None:
        # Found otherwise after the data are read and the prior is built (a mismatch), or at
        # the first checkpoint or the end of fit (an output directory): refuse them now.
        shape = getattr(self.model, "sample_shape", None)
        if shape is not None and self.datamodule is not None:
            check_data_fits_model(self.datamodule, tuple(shape), "the UNet")
        for what, directory in output_directories(self.trainer, self.subcommand == "fit"):
            check_directory_writable(directory, what)
        for what, file in output_files(self.trainer, self.subcommand == "fit"):
            check_file_writable(file, what)

    def before_validate(self) -> None:
        self._check_before_running()

    def before_test(self) -> None:
        self._check_before_running()

    def before_predict(self) -> None:
        self._check_before_running()

    def before_fit(self) -> None:
        self._check_before_running()
        # A resumed run restores its prior from the checkpoint; Lightning reads ckpt_path only
        # after the callbacks' setup, so CheckpointPrior is told here not to rebuild it (and
        # the config saver to keep the config of the run this one continues). `last` with
        # nothing to resume was turned into None in parse_arguments: the prior is built.
        if self.config_init[self.subcommand].get("ckpt_path"):
            for callback in self.trainer.callbacks:
                if isinstance(callback, (CheckpointPrior, RunConfigSaver)):
                    callback.resuming = True


def _variance_floor(text: str) -> float:
    """``--min-var``: NaN or a floor <= 0 would only fail once the prior is built."""
    try:
        return check_min_var(float(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _check_prior_out(out: str, checkpoints: list[str]) -> None:
    """Refuse, before the checkpoints are read, an ``--out`` that would replace one of them
    (or a file of a checkpoint directory) or that cannot be written."""
    target = Path(out).resolve()  # ./a, a and a symbolic link to a are one file
    for checkpoint in checkpoints:
        source = Path(checkpoint).resolve()
        if target == source or (target.exists() and source in target.parents):
            which = "the checkpoint" if target == source else "a file of the checkpoint"
            raise ValueError(f"--out {out} is {which} {checkpoint}: writing the prior there "
                             "would replace an input; give --out a path of its own")
    check_file_writable(out, "prior file (--out)")


def prior_command(args: list[str]) -> None:
    """``vdu prior``: build a prior file from K checkpoints and print its summary."""
    parser = argparse.ArgumentParser(
        prog="vdu prior",
        description="Build the checkpoint prior N(mean, diag var) of VDU from K checkpoints "
                    "(DiffusionModule .ckpt files, diffusers directories, Hub model IDs or UNet "
                    "state dicts), reading one at a time.",
    )
    parser.add_argument("--checkpoints", nargs="+", required=True,
                        help="K >= 2 checkpoints: files, directories or Hub IDs (owner/name)")
    parser.add_argument("--revision", default=None,
                        help="the branch, tag or commit of every Hub ID (or owner/name@rev)")
    parser.add_argument("--subfolder", default=None,
                        help="the model's folder inside each directory or repository, e.g. unet")
    parser.add_argument("--out", required=True, help="the prior file to write (.safetensors)")
    parser.add_argument("--source", choices=CHECKPOINT_SOURCES, default="trajectory",
                        help="how the checkpoints relate (recorded in the file)")
    parser.add_argument("--include", nargs="+", default=None,
                        help="shell-style patterns of parameter names to cover (default: all)")
    parser.add_argument("--min-var", type=_variance_floor, default=DEFAULT_MIN_VAR,
                        help="floor of the variance (positive)")
    parser.add_argument("--weights", choices=sorted(WEIGHT_PREFIXES), default="ema",
                        help="EMA or raw weights of DiffusionModule checkpoints")
    options = parser.parse_args(args)
    try:
        _check_prior_out(options.out, options.checkpoints)
        prior = ParameterPrior.from_checkpoints(options.checkpoints, options.source,
                                                options.include, options.min_var,
                                                options.weights, options.revision,
                                                options.subfolder)
    except (OSError, ValueError) as err:
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
    if argv[:1] == ["relearn"]:
        from vdu_lightning.relearn import relearn_command

        relearn_command(argv[1:])
        return
    if argv[:1] == ["generate-forget-set"]:
        # Like the demo: the module is imported only when its command is run.
        from vdu_lightning.methods.text_to_image.forget_set import generate_forget_set_command

        generate_forget_set_command(argv[1:])
        return
    VDUCLI(args=args)


if __name__ == "__main__":
    main()
