"""``PriorSnapshot`` and ``CheckpointPrior`` under ``ddp_spawn`` (two CPU processes, gloo)
behave as with one process: the same prior, written once, held alike by every rank."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy

from conftest import TINY_UNET
from probes import RankProbe
from vdu_lightning import DiffusionModule, ForgetSetDataModule, ParameterPrior, VDUModule
from vdu_lightning.callbacks import CheckpointPrior, PriorSnapshot

pytestmark = pytest.mark.timeout(300)
GLOBAL_BATCH = 8


class NoiseFreeDiffusion(DiffusionModule):
    """A loss without random noise: the mean over the batch of a fixed-timestep output.

    With the whole data set as one global batch, the averaged DDP gradient equals the one
    process's gradient, so both runs follow the same trajectory (to rounding). Plain SGD:
    Adam divides by the gradient's size, which turns the rounding of near-zero gradients
    (summed in another order on two ranks) into differences of a whole step.
    """

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        t = torch.full((batch["image"].shape[0],), 10, device=self.device)
        return self.unet(batch["image"], t).sample.square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.unet.parameters(), lr=0.05)


def _spawn_or_single(world: int) -> dict:
    if world == 1:
        return {"devices": 1, "strategy": "auto"}
    ddp = DDPStrategy(start_method="spawn", timeout=timedelta(seconds=60))
    return {"devices": world, "strategy": ddp}


def _fit(module: pl.LightningModule, callbacks: list, world: int, max_steps: int) -> None:
    # The forget set is the whole data set: 8 items, each process takes its share.
    data = ForgetSetDataModule(dataset="digits", forget_classes=[0], forget_size=GLOBAL_BATCH,
                               eval_size=4, batch_size=GLOBAL_BATCH // world)
    trainer = pl.Trainer(accelerator="cpu", max_steps=max_steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0,
                         callbacks=callbacks, **_spawn_or_single(world))
    trainer.fit(module, datamodule=data)


@pytest.mark.parametrize("source", ["trajectory", "finetune"])
def test_prior_snapshot_writes_the_same_prior_with_one_or_two_processes(
        tmp_path: Path, source: str) -> None:
    priors = {}
    for world in (1, 2):
        torch.manual_seed(0)
        module = NoiseFreeDiffusion(unet=dict(TINY_UNET), num_train_timesteps=100)
        path = tmp_path / f"prior_{world}.safetensors"
        snapshot = PriorSnapshot(str(path), every_n_steps=2, source=source,
                                 weights="raw" if source == "finetune" else "ema")
        _fit(module, [snapshot], world, max_steps=6)
        priors[world] = ParameterPrior.load(path)
    single, ddp = priors[1], priors[2]
    assert (ddp.count, ddp.source, ddp.names) == (single.count, single.source, single.names)
    assert single.count == 3
    assert not list(tmp_path.glob(".*"))  # written once, atomically: no temporary left
    for name in single.names:
        torch.testing.assert_close(ddp.mean[name], single.mean[name], rtol=1e-6, atol=1e-7)
        # A variance is a difference of close weights: rounding weighs more on it.
        torch.testing.assert_close(ddp.var[name], single.var[name], rtol=1e-4, atol=1e-10)


def test_checkpoint_prior_gives_every_rank_the_prior_one_process_builds(
        tmp_path: Path) -> None:
    paths = []
    for seed in range(3):
        torch.manual_seed(seed)
        DiffusionModule(unet=dict(TINY_UNET)).save_pretrained(tmp_path / f"m{seed}")
        paths.append(str(tmp_path / f"m{seed}"))
    expected = ParameterPrior.from_checkpoints(paths, "independent", include=["up_blocks.*"])
    for world in (1, 2):
        out = tmp_path / f"world{world}"
        callback = CheckpointPrior(checkpoints=paths, source="independent",
                                   include=["up_blocks.*"],
                                   save_to=str(out / "built.safetensors"))
        _fit(VDUModule(paths[0], lr=1e-3), [callback, RankProbe(str(out))], world,
             max_steps=2)
        saved = ParameterPrior.load(out / "built.safetensors")
        assert saved.names == expected.names
        for rank in range(world):
            seen = torch.load(out / f"rank{rank}.pt", weights_only=True)
            assert seen["world_size"] == world and seen["prior_tensors_kept"]
            for name in expected.names:
                assert torch.equal(seen["prior_var"][name], expected.var[name])
                assert torch.equal(saved.var[name], expected.var[name])
                assert torch.equal(saved.mean[name], expected.mean[name])
