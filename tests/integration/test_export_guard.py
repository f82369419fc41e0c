"""A run that trains nothing (``--trainer.max_steps=0``) exports nothing, and says so: the
earlier export is not replaced by the weights the run started from."""

from __future__ import annotations

from pathlib import Path

import pytest

from unlearning_runs import tiny_job
from vdu_lightning.cli import main

EXPORT = {"class_path": "vdu_lightning.callbacks.ExportPretrained",
          "init_args": {"dirpath": "unlearned"}}


def test_a_run_of_zero_steps_keeps_the_earlier_export(tmp_path: Path) -> None:
    job = tiny_job(tmp_path, max_steps=2, callbacks=[EXPORT])
    main(["fit", "--config", str(job)])
    exported = {p: p.read_bytes() for p in sorted((tmp_path / "unlearned").rglob("*"))
                if p.is_file()}
    assert exported

    with pytest.warns(UserWarning, match=r"ExportPretrained: no training step was taken "
                                         r"\(trainer\.max_steps=0\): nothing was exported, "
                                         r"and unlearned keeps what it held"):
        main(["fit", "--config", str(job), "--trainer.max_steps=0",
              "--trainer.default_root_dir=second_run"])
    assert {p: p.read_bytes() for p in exported} == exported
    assert sorted(p for p in (tmp_path / "unlearned").rglob("*") if p.is_file()) == list(
        exported)
