"""The code passes flake8 with the project's rules (setup.cfg), among them the ban on
``pytorch_lightning`` imports: Lightning's two import roots are distinct class hierarchies."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_flake8_is_clean() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "flake8", "vdu_lightning", "tests", "benchmarks"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
