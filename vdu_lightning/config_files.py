"""The YAML configs of the repository's ``configs/`` folder, for code that runs them itself.

``vdu demo`` builds its runs from configs/mnist5k/*.yaml, and ``vdu demo --quick``, the tests
and the benchmarks take their tiny UNet from configs/tests/tiny_pretrain.yaml, so that each
setting is written in one file: the one ``vdu fit --config`` runs.

Where they are: ``configs/`` sits beside the package, in the source checkout that the README's
install (``pip install -e .``) runs in place. It is not package data, on purpose: setuptools
ships package data only from inside ``vdu_lightning/``, and moving the folder there (or
linking it there: a link is lost by a Windows checkout and by an sdist) would move every
documented ``vdu fit --config configs/...`` path. So a wheel install has no configs; asking
for one there fails with the folder that was looked in, and the callers take another folder
(``vdu demo --configs``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

#: The config whose UNet is the tiny one (8×8, no attention) of the tests and smoke runs.
TINY_CONFIG = "tests/tiny_pretrain.yaml"


def configs_dir() -> Path:
    """The repository's ``configs/`` folder: beside the package in a source checkout.

    Raises:
        FileNotFoundError: there is none (a wheel install), naming where it was looked for.
    """
    # resolve(): an editable install that links the modules into a build folder still names
    # the checkout.
    folder = Path(__file__).resolve().parent.parent / "configs"
    if not folder.is_dir():
        raise FileNotFoundError(
            f"no configs folder at {folder}: the shipped configs are in the repository's "
            "configs/, which a source checkout installed with `pip install -e .` has beside "
            "the package; a wheel install has none, so name a checkout's configs/ folder")
    return folder


def load_config(name: str, directory: str | os.PathLike | None = None) -> dict[str, Any]:
    """The config ``name`` (relative to ``configs/``, e.g. ``"mnist5k/vdu.yaml"``), parsed.

    ``directory`` is the configs folder to read (default ``configs_dir()``).

    Raises:
        FileNotFoundError: no such config (or no configs folder), naming the path.
    """
    path = (Path(directory) if directory is not None else configs_dir()) / name
    if not path.is_file():
        raise FileNotFoundError(f"no config {name} at {path}")
    config = yaml.safe_load(path.read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a config: its top level is not a mapping")
    return config


def tiny_unet(directory: str | os.PathLike | None = None) -> dict[str, Any]:
    """The ``UNet2DModel`` keyword arguments of ``TINY_CONFIG`` (a new dict on each call)."""
    return load_config(TINY_CONFIG, directory)["model"]["init_args"]["unet"]


__all__ = ["TINY_CONFIG", "configs_dir", "load_config", "tiny_unet"]
