"""What ``--ckpt_path`` may resume, decided from the config and the file before any work.

The config alone says what the model is (its class and arguments); a checkpoint only restores
the state of that model. So a checkpoint is refused when it was written by another class,
and nothing it names is ever imported. ``last`` is resolved here to the file Lightning would
take, so that the same checks apply to it and a first run (nothing to resume yet) is known
to start afresh before any callback sets up.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint
from lightning.pytorch.utilities import rank_zero_warn

from vdu_lightning.files import load_checkpoint
from vdu_lightning.methods.vdu.module import prior_in_checkpoint

#: The checkpoints Lightning writes on SLURM's pre-emption signal.
_HPC_NAME = re.compile(r"hpc_ckpt_(\d+)\.ckpt")


def _imported_class(class_path: str) -> Any:
    """The object a dotted path names, looked up among modules already imported only: a
    path read from a checkpoint must never import (that is, run) a module."""
    module, _, name = class_path.rpartition(".")
    return getattr(sys.modules[module], name, None) if module in sys.modules else None


def _config_class(class_path: str) -> Any:
    """The class a config names (imported by the parser already; the user's choice)."""
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [] if value is None else [value]


def _last_checkpoint_places(trainer: Any) -> list[tuple[Path, Callable[[str], bool]]]:
    """(directory, which file names count) of every place Lightning looks in for ``last``."""
    callbacks = [(_config_class(c["class_path"]), c.get("init_args") or {})
                 for c in _as_list(trainer.get("callbacks"))]
    checkpoints = [(cls, args) for cls, args in callbacks if issubclass(cls, ModelCheckpoint)]
    if not checkpoints and trainer.get("enable_checkpointing") is not False:
        checkpoints = [(ModelCheckpoint, {})]  # the one the Trainer adds
    root = Path(trainer.get("default_root_dir") or os.getcwd())
    logger_off = trainer.get("logger") is False or trainer.get("logger") == []
    places = []
    for cls, args in checkpoints:
        def is_last(name: str, cls: type = cls) -> bool:  # as ModelCheckpoint's own test
            return (Path(name).suffix == cls.FILE_EXTENSION
                    and Path(name).stem.startswith(cls.CHECKPOINT_NAME_LAST))
        if args.get("dirpath"):
            places.append((Path(args["dirpath"]).expanduser(), is_last))
        elif logger_off:
            places.append((root / "checkpoints", is_last))
        else:
            raise ValueError(
                f"--ckpt_path last: {cls.__name__} has no dirpath, so it writes into the "
                "logger's directory of each run (a new version every run), where no earlier "
                "checkpoint can be found: give it a dirpath, or give --ckpt_path the path of "
                "the checkpoint")
    if not any(args.get("save_last") for _, args in checkpoints):
        rank_zero_warn("--ckpt_path last: no ModelCheckpoint of this config has save_last: "
                       "true, so its runs write no last.ckpt to resume from")
    for cls, args in callbacks:
        if issubclass(cls, OnExceptionCheckpoint):
            path = Path(cls(**dict(args.items())).ckpt_path)  # made only for its file's name
            places.append((path.parent.expanduser(), path.name.__eq__))
    return places


def find_last_checkpoint(trainer: Any) -> str | None:
    """The file ``--ckpt_path last`` names for the trainer config ``trainer``, chosen as
    Lightning chooses it (the newest of the candidates); None when there is none yet, and
    ``"last"`` itself when a candidate folder is remote (``s3://...``), which only Lightning
    (through fsspec) can list.

    Raises:
        ValueError: a ``ModelCheckpoint`` without ``dirpath`` writes into a directory that
            is new for every run (the logger's version): ``last`` can never find it.
    """
    folders = [(c.get("init_args") or {}).get("dirpath")
               for c in _as_list(trainer.get("callbacks"))]
    if any("://" in str(folder) for folder in [*folders, trainer.get("default_root_dir")]):
        return "last"  # pathlib would turn s3://b into s3:/b, which is not there
    places = _last_checkpoint_places(trainer)
    found = [directory / name for directory, counts in places
             if directory.is_dir() for name in os.listdir(directory) if counts(name)]
    return str(max(found, key=os.path.getmtime)) if found else None


def find_hpc_checkpoint(trainer: Any) -> str | None:
    """The ``hpc_ckpt_<n>.ckpt`` of the highest n in ``default_root_dir``: the file Lightning
    resumes from for ``--ckpt_path hpc`` and for a job SLURM requeued; None when there is
    none (or the directory is remote)."""
    root = str(trainer.get("default_root_dir") or os.getcwd())
    if "://" in root or not os.path.isdir(root):
        return None
    versions = [int(match.group(1)) for name in os.listdir(root)
                if (match := _HPC_NAME.fullmatch(name))]
    return os.path.join(root, f"hpc_ckpt_{max(versions)}.ckpt") if versions else None


def check_resumable(path: str, model_class_path: str) -> None:
    """Refuse, naming ``path``, a checkpoint that is missing, damaged, carries code, was
    written by another class than ``model_class_path``, or holds a prior that cannot serve.

    Read memory-mapped: only the hyperparameters (and the prior, if any) are read.
    """
    checkpoint = load_checkpoint(path)
    # A checkpoint written outside LightningCLI records no class: only its state is checked
    # then (strict loading refuses another network's state).
    written_by = (checkpoint.get("hyper_parameters") or {}).get("_class_path")
    if written_by is not None and _imported_class(written_by) is not _config_class(
            model_class_path):
        raise ValueError(
            f"{path} was written by {written_by}, and this run's model is {model_class_path}: "
            "a checkpoint restores the state of the class the config names, it never chooses "
            "the class; resume it with the config it was written with")
    prior_in_checkpoint(checkpoint, path)
