"""Callbacks that tests add to ``vdu fit`` runs in other processes (``class_path: probes.X``).

What a rank saw can only come back through files: each rank writes its own.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch


class RankProbe(pl.Callback):
    """Writes ``<out_dir>/rank<r>.pt`` per rank at the end of training: the network's final
    weights, the timesteps and noise of the first step, the buffers DDP would broadcast,
    and whether the prior's tensors stayed the same objects from the first step to the end.
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.record: dict[str, Any] = {}
        self._prior_pointers: list[int] = []

    @staticmethod
    def _pointers(pl_module: pl.LightningModule) -> list[int]:
        _, means, inv_stds = pl_module._prior_tensors()
        return [t.data_ptr() for t in means + inv_stds]

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if self.record:
            return
        # The draws of the first step, from a copy of the module's own noise stream.
        generator = torch.Generator().set_state(pl_module.noise.generator.get_state())
        _, noise, t = pl_module.noised(batch["image"], generator)
        wrapped = trainer.strategy.model  # DistributedDataParallel under DDP
        self.record = {
            "timesteps": t, "noise": noise, "labels": batch["label"],
            "wrapper": type(wrapped).__name__,
            "broadcast_buffers": getattr(wrapped, "broadcast_buffers", None),
            "buffer_names": [name for name, _ in wrapped.named_buffers()],
            "prior_numel": pl_module.prior.numel,
        }
        self._prior_pointers = self._pointers(pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.record["prior_tensors_kept"] = self._pointers(pl_module) == self._prior_pointers
        self.record["prior_var"] = dict(pl_module.prior.var)
        self.record["weights"] = {n: p.detach().clone()
                                  for n, p in pl_module.unet.state_dict().items()}
        self.record["world_size"] = trainer.world_size
        self.record["global_step"] = trainer.global_step
        Path(self.out_dir).mkdir(parents=True, exist_ok=True)
        torch.save(self.record, Path(self.out_dir) / f"rank{trainer.global_rank}.pt")


class SlowSteps(pl.Callback):
    """Sleeps after every step, so that a test can kill a run part-way (no effect on results)."""

    def __init__(self, seconds: float = 0.3) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        time.sleep(self.seconds)
