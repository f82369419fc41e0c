"""SFDModule under DDP (ddp_spawn, two CPU processes, gloo): both networks stay in step."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy

from conftest import TINY_UNET
from vdu_lightning import DiffusionModule, SFDModule

pytestmark = pytest.mark.timeout(300)


class SFDProbe(pl.Callback):
    """Writes ``rank<r>.pt``: the first iteration's labels and the final weights."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.labels: torch.Tensor | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        if self.labels is None:  # from a copy of the module's own stream
            generator = torch.Generator().set_state(pl_module.noise.generator.get_state())
            self.labels = pl_module.draw_conditions(generator)[0]

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        record = {"labels": self.labels, "iteration": pl_module.iteration,
                  "weights": {k: v.detach().clone() for k, v in pl_module.state_dict().items()}}
        torch.save(record, Path(self.out_dir) / f"rank{trainer.global_rank}.pt")


def test_two_processes_end_with_the_same_networks_from_different_draws(tmp_path: Path) -> None:
    torch.manual_seed(0)
    DiffusionModule(unet=dict(TINY_UNET), num_classes=10,
                    num_train_timesteps=100).save_pretrained(tmp_path / "teacher")
    module = SFDModule(str(tmp_path / "teacher"), forget_classes=[3], t_min=5, t_max=80,
                       t_init=50, lr=1e-3, batch_size=8, steps_per_epoch=3)
    start = {k: v.detach().clone() for k, v in module.state_dict().items()}
    strategy = DDPStrategy(start_method="spawn", find_unused_parameters=True,
                           timeout=timedelta(seconds=60))
    pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=6, logger=False,
               enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, callbacks=[SFDProbe(str(tmp_path))]).fit(module)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["iteration"] for r in ranks] == [3, 3]
    assert not torch.equal(ranks[0]["labels"], ranks[1]["labels"])  # a stream per rank
    for name, tensor in ranks[0]["weights"].items():
        assert torch.equal(tensor, ranks[1]["weights"][name]), name  # gradients all-reduced
    for network in ("generator", "fake_score", "ema_generator"):
        assert any(not torch.equal(tensor, start[name])
                   for name, tensor in ranks[0]["weights"].items()
                   if name.startswith(network + ".")), network
