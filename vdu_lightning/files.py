"""Writing files and directories atomically, and loading checkpoints without unpickling.

A reader (a user, a later stage, a resumed job) must never see a half-written file or model
directory: everything is written beside its destination and moved into place in one rename.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


def _check_parent_writable(path: Path) -> None:
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"cannot write to {parent}: the directory is not writable")


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


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a ``.ckpt``/``.pt`` file as plain tensors and values, never running pickled code.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is truncated, corrupt, or holds objects other than plain data.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises several types for corrupt or unsafe files
        raise ValueError(
            f"cannot load checkpoint {path}: it is truncated, corrupt, or holds objects other "
            f"than tensors and plain values (only weights_only=True loading is allowed): {err}"
        ) from err
