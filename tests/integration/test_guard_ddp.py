"""``UnlearningGuard`` under ``ddp_spawn`` (two CPU processes): a NaN on one rank stops every
rank at the same step, none hangs, and the last checkpoint holds the last good weights."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy

from unlearning_runs import tiny_job
from vdu_lightning import ForgetSetDataModule, ParameterPrior, VDUModule
from vdu_lightning.callbacks import NonFiniteLossError, UnlearningGuard
from vdu_lightning.files import load_checkpoint

pytestmark = pytest.mark.timeout(240)
NAN_STEP = 3


class NaNOnRankOne(VDUModule):
    """Rank 1's plasticity turns NaN at ``NAN_STEP``; rank 0's loss stays finite."""

    def plasticity_loss(self, batch):
        loss = super().plasticity_loss(batch)
        return loss * float("nan") if (self.global_rank, self.global_step) == (1, NAN_STEP) \
            else loss


class RecordingGuard(UnlearningGuard):
    """The guard, writing each rank's message to a file before it raises (only rank 0's
    error reaches the test otherwise)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        try:
            super().on_before_optimizer_step(trainer, pl_module, optimizer)
        except NonFiniteLossError as err:
            (Path(self.out_dir) / f"stopped_rank{trainer.global_rank}.txt").write_text(str(err))
            raise


def test_a_nan_on_one_rank_stops_both_and_keeps_the_last_good_checkpoint(
        tmp_path: Path) -> None:
    tiny_job(tmp_path)  # the pre-trained model and prior files
    module = NaNOnRankOne(str(tmp_path / "ddpm"), lr=1e-3)
    module.set_prior(ParameterPrior.load(tmp_path / "prior.safetensors"))
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True,
                                  every_n_train_steps=1)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, max_steps=10, logger=False, limit_val_batches=0,
        enable_progress_bar=False, enable_model_summary=False,
        # A timeout so that a rank left waiting in a collective fails instead of hanging.
        strategy=DDPStrategy(start_method="spawn", timeout=timedelta(seconds=60)),
        callbacks=[RecordingGuard(str(tmp_path)), checkpoints])
    data = ForgetSetDataModule(dataset="digits", forget_classes=[3], forget_size=32,
                               eval_size=8, batch_size=8)
    with pytest.raises(Exception, match=rf"unlearning stopped at step {NAN_STEP}"):
        trainer.fit(module, datamodule=data)
    # Rank 1 names its term; rank 0 sees the NaN only in the all-reduced gradient.
    messages = [(tmp_path / f"stopped_rank{r}.txt").read_text() for r in (0, 1)]
    assert f"step {NAN_STEP}: the gradient (NaN or inf, on this process or another)" \
        in messages[0]
    assert f"step {NAN_STEP}: plasticity = nan" in messages[1]
    last = load_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert last["global_step"] == NAN_STEP
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values())
