"""ForgetSetDataModule under real DDP (two CPU processes, gloo): each item seen once an epoch
(when the set does not divide evenly, ranks are kept in step by repeating fewer items than
there are ranks, and nothing is dropped)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from vdu_lightning import ForgetSetDataModule


class IndexedImages(torch.utils.data.Dataset):
    """Item i is an image filled with the value i, so a batch tells which items it holds."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        return {"image": torch.full((1, 8, 8), float(index)), "label": 0}


class RecordItems(pl.LightningModule):
    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.out_dir = out_dir
        self.seen: list[int] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.seen += batch["image"][:, 0, 0, 0].long().tolist()
        return self.weight * batch["image"].mean()

    def on_train_epoch_end(self) -> None:
        path = Path(self.out_dir) / f"rank{self.global_rank}.json"
        path.write_text(json.dumps(self.seen))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def teardown(self, stage: str) -> None:
        # Lightning leaves the gloo group alive in a spawned worker; torn down at the
        # process's exit, its threads can abort it (std::terminate) after the work is done.
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@pytest.mark.parametrize("size", [20, 21])
def test_forget_set_is_sharded_without_drops_or_needless_duplicates(tmp_path: Path,
                                                                    size: int) -> None:
    data = ForgetSetDataModule(dataset="digits", forget_dataset=IndexedImages(size),
                               forget_size=size, batch_size=4)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=1,
                         limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(RecordItems(str(tmp_path)), datamodule=data)
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    share = -(-size // 2)  # ceil: both ranks take the same number of items
    assert len(seen[0]) == len(seen[1]) == share
    assert sorted(set(seen[0] + seen[1])) == list(range(size))  # nothing dropped
    assert len(seen[0] + seen[1]) - size == size % 2  # one repeat when the size is odd
    assert len(set(seen[0])) == len(set(seen[1])) == share  # no item twice on one rank
