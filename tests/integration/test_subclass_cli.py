"""A user's ``VDUModule`` subclass with its own ``__init__`` runs under ``vdu fit`` and under
a bare ``LightningCLI``, with an explicit signature (forwarding only some of the base's
arguments) and with ``**kwargs`` (docs/unlearning.md shows both)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from lightning.pytorch.cli import LightningCLI

from unlearning_runs import tiny_job
from vdu_lightning import ForgetSetDataModule, VDUModule
from vdu_lightning.cli import VDUCLI


class ExplicitVDU(VDUModule):
    """Its own signature, no ``**kwargs``: the base's other arguments keep their defaults."""

    def __init__(self, pretrained: str, gamma: float = 0.5, lr: float = 1e-4,
                 scale: float = 1.0) -> None:
        super().__init__(pretrained, gamma=gamma, lr=lr)
        self.scale = scale

    def plasticity_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.scale * super().plasticity_loss(batch)


class KwargsVDU(VDUModule):
    """Its own argument, the base's through ``**kwargs``."""

    def __init__(self, pretrained: str, scale: float = 1.0, **kwargs: Any) -> None:
        super().__init__(pretrained, **kwargs)
        self.scale = scale

    def plasticity_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.scale * super().plasticity_loss(batch)


def bare_config(job: Path) -> Path:
    """The job for ``LightningCLI(Class, ForgetSetDataModule)``: arguments without
    ``class_path``/``init_args``."""
    config = yaml.safe_load(job.read_text())
    config["model"] = config["model"]["init_args"]
    config["data"] = config["data"]["init_args"]
    path = job.with_name("bare.yaml")
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("cli", ["vdu fit", "bare LightningCLI"])
@pytest.mark.parametrize("subclass", [ExplicitVDU, KwargsVDU])
def test_a_subclass_with_its_own_init_runs_through_the_cli(
        subclass: type, cli: str, tmp_path: Path) -> None:
    job = tiny_job(tmp_path, max_steps=2)  # gamma 0.5, lr 1e-3
    if cli == "vdu fit":
        run = VDUCLI(args=["fit", "--config", str(job),
                           f"--model.class_path={__name__}.{subclass.__name__}",
                           "--model.init_args.scale=3.0"])
    else:
        run = LightningCLI(subclass, ForgetSetDataModule,
                           args=["fit", "--config", str(bare_config(job)), "--model.scale=3.0"])
    module = run.model
    assert type(module) is subclass and run.trainer.global_step == 2
    assert (module.scale, module.gamma, module.lr) == (3.0, 0.5, 1e-3)
    assert (module.weights, module.reduction, module.optimizer) == ("ema", "mean", "adam")
    assert run.trainer.optimizers[0].defaults["lr"] == 1e-3
