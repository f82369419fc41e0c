"""Writing files and directories atomically, and loading checkpoints without unpickling.

A reader (a user, a later stage, a resumed job) must never see a half-written file or model
directory: everything is written beside its destination and moved into place in one rename.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


def check_directory_writable(path: str | os.PathLike, what: str = "output directory") -> None:
    """Raise if the directory ``path`` could not be created or written into; create nothing.

    Meant to run before any work whose result would go there: the nearest existing ancestor
    of ``path`` (``path`` itself when it exists) must be a directory this process may write.

    Raises:
        NotADirectoryError: that ancestor is a file.
        PermissionError: that ancestor is not writable.

    Example:
        >>> check_directory_writable("runs/mnist5k/ddpm", "ExportPretrained dirpath")
    """
    _check_writable(Path(path), Path(path), what)


def check_file_writable(path: str | os.PathLike, what: str = "output file") -> None:
    """Raise if the file ``path`` could not be written; create nothing.

    As ``check_directory_writable`` for its directory, and ``path`` must not be a directory:
    found only when the file is moved into place, after the work that made it.

    Raises:
        IsADirectoryError: ``path`` is an existing directory.
        NotADirectoryError, PermissionError: as ``check_directory_writable``.

    Example:
        >>> check_file_writable("runs/mnist5k/prior.safetensors", "CheckpointPrior save_to")
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"cannot write the {what} {path}: it is an existing directory; "
                                "give the path of a file")
    _check_writable(path.parent, path, what)


def _check_writable(directory: Path, target: Path, what: str) -> None:
    existing = next((p for p in (directory, *directory.parents) if p.exists()), Path.cwd())
    if not existing.is_dir():
        raise NotADirectoryError(f"cannot write the {what} {target}: {existing} is a file, not "
                                 "a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write the {what} {target}: {existing} is not writable")


def _check_parent_writable(path: Path) -> None:
    check_directory_writable(path.parent, "directory")
    path.parent.mkdir(parents=True, exist_ok=True)


def _umask_mode(mode: int) -> int:
    """``mode`` less the process umask: what open()/mkdir() would have given."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces ``path`` only if the block succeeds.

    On an exception the temporary directory is removed and whatever was at ``path`` stays.

    Example:
        >>> with atomic_directory("out/model") as tmp:  # doctest: +SKIP
        ...     (tmp / "config.json").write_text("{}")
    """
    path = Path(path)
    _check_parent_writable(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    # mkdtemp makes the directory private (0700); the result should be readable like any
    # directory the user creates.
    tmp.chmod(_umask_mode(0o777))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # A non-empty directory cannot be replaced in one rename: move the old one aside first,
    # so that at every instant either the old or the new complete directory is at `path`.
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        os.replace(path, old / path.name)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path in the same directory, renamed onto ``path`` on success."""
    path = Path(path)
    _check_parent_writable(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        tmp.chmod(_umask_mode(0o666))  # mkstemp's 0600 would make every written file private
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


class PickledObjectsRefused(ValueError):
    """A file holds pickled objects other than tensors and plain values: never loaded."""


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a ``.ckpt``/``.pt`` file as plain tensors and values, never running pickled code.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is truncated or corrupt.
        PickledObjectsRefused: it holds objects other than plain data (unpickling them could
            run code).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise ValueError(f"cannot load checkpoint {path}: it is corrupt ({err})") from err
        # torch's message goes on to suggest weights_only=False: keep only what it refused.
        refused = re.search(r"WeightsUnpickler error: (.+?\.)(?: |$)", str(err), re.MULTILINE)
        raise PickledObjectsRefused(
            f"refused to load checkpoint {path}: it holds objects other than tensors and plain "
            "values, and unpickling them could run code; checkpoints are only loaded with "
            f"weights_only=True ({refused.group(1) if refused else 'see the cause above'})"
        ) from err
    except Exception as err:  # torch raises RuntimeError and others for a damaged file
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"cannot load checkpoint {path}: the file is truncated or is not a "
                         f"PyTorch checkpoint ({reason})") from err
