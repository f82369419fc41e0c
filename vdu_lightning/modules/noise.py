"""``NoiseStreams``: each rank's generator of diffusion noise and timesteps, resumable.

Every DDP rank is seeded alike (its weights must agree), so noise comes from a generator
seeded per rank (``seeding.rank_generator``). Its state is training state: Lightning calls
``on_save_checkpoint`` on every rank and writes rank 0's dict, so the states of all ranks are
gathered into it and each rank takes its own back on resume.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from vdu_lightning.seeding import rank_generator

#: The checkpoint key holding one generator state per rank.
CHECKPOINT_KEY = "noise_generator_states"


class NoiseStreams:
    """The module's per-rank generator (``generator``), saved and restored with checkpoints.

    Call ``start`` from ``on_train_start`` (not ``on_fit_start``: a resumed ``global_step``
    is only restored after that hook), ``save`` from ``on_save_checkpoint`` and ``load`` from
    ``on_load_checkpoint``.
    """

    def __init__(self) -> None:
        self.generator: torch.Generator | None = None
        self._resumed: torch.Tensor | None = None

    def start(self, module: pl.LightningModule) -> None:
        self.generator = rank_generator(module.device, module.global_rank)
        states, self._resumed = self._resumed, None
        if states is None:
            return
        try:
            if len(states) != module.trainer.world_size:
                raise ValueError(f"saved by {len(states)} processes")
            # A row of the stacked states is a view into the others' storage, which
            # set_state reads out of bounds (a segfault): it needs a tensor of its own.
            self.generator.set_state(states[module.global_rank].clone())
        except (ValueError, RuntimeError) as err:
            # Another world size or device type: a fresh stream per rank, still distinct
            # from the one before the checkpoint because the step enters the seed.
            rank_zero_warn(f"the checkpoint's noise streams cannot be continued ({err}); "
                           "new streams are seeded from (seed, rank, step)")
            self.generator = rank_generator(module.device, module.global_rank,
                                            offset=module.global_step)

    def save(self, module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.generator is None:
            return
        state = self.generator.get_state().to(module.device)
        gathered = module.trainer.strategy.all_gather(state)
        checkpoint[CHECKPOINT_KEY] = gathered.reshape(-1, state.numel()).cpu()

    def load(self, checkpoint: dict[str, Any]) -> None:
        self._resumed = checkpoint.get(CHECKPOINT_KEY)


class NoiseStreamsHooks:
    """The Lightning hooks that run a module's ``self.noise`` (a ``NoiseStreams``): put it
    before ``pl.LightningModule`` in the bases; each hook calls the next class's too."""

    noise: NoiseStreams

    @override
    def on_train_start(self) -> None:
        super().on_train_start()
        self.noise.start(self)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        self.noise.save(self, checkpoint)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.noise.load(checkpoint)
