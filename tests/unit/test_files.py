"""Atomic writes: all or nothing, with the permissions of an ordinary file or folder."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from vdu_lightning.files import atomic_directory, atomic_write_text


def test_written_files_and_folders_get_the_usual_permissions(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        with atomic_directory(tmp_path / "model") as tmp:
            (tmp / "config.json").write_text("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o755


def test_a_failed_write_leaves_the_old_content_and_no_temporary(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "a_dir"):
            raise RuntimeError("export failed")
    assert (tmp_path / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
