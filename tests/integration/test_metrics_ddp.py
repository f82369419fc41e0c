"""The metrics and the evaluation callback under real DDP (two CPU processes, gloo).

Summed over two ranks, each holding its share of the samples, the states and values must
equal those of one process holding them all.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.strategies import DDPStrategy
from PIL import Image

from evaluation_helpers import TinyUnlearner, one_thread, tiny_classifier
from vdu_lightning import ClassifierModule, ForgetSetDataModule
from vdu_lightning.callbacks.evaluation import UnlearningEvaluation
from vdu_lightning.metrics import PercentUnlearned, UnlearnedFID

WORLD = 2
FID_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples",
              "fake_features_sum", "fake_features_cov_sum", "fake_features_num_samples")


def _inputs() -> dict[str, torch.Tensor]:
    """The same predictions and images in every process (odd sizes: uneven shares)."""
    generator = torch.Generator().manual_seed(0)
    return {
        "original": torch.randint(0, 10, (301,), generator=generator),
        "unlearned": torch.randint(0, 10, (301,), generator=generator),
        "real": torch.rand(151, 1, 8, 8, generator=generator) * 2 - 1,
        "fake": torch.rand(97, 1, 8, 8, generator=generator) * 1.5 - 0.8,
    }


def _evaluate(classifier_dir: str, rank: int, world: int) -> dict:
    """Both metrics over this rank's share ``[rank::world]``; the synced values and states."""
    inputs = {k: v[rank::world] for k, v in _inputs().items()}
    pul = PercentUnlearned(10, [2, 7])
    pul.update(inputs["original"], inputs["unlearned"])
    fid = UnlearnedFID(classifier=ClassifierModule.from_pretrained(classifier_dir))
    fid.update(inputs["real"], real=True)
    fid.update(inputs["fake"], real=False)
    result = {"pul": pul.compute(), "histograms": pul.histograms(), "fid": fid.compute(),
              "local_count": int(pul.original_counts.sum())}
    fid.sync(should_sync=world > 1)
    result["fid_states"] = {name: getattr(fid, name).clone() for name in FID_STATES}
    fid.unsync(should_unsync=world > 1)
    return result


def _worker(rank: int, classifier_dir: str, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    # A timeout so that a rank stuck in a collective fails the test instead of hanging it.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        torch.save(_evaluate(classifier_dir, rank, WORLD), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(240)
def test_metric_states_summed_over_ranks_equal_one_process(tmp_path: Path) -> None:
    tiny_classifier(tmp_path / "classifier")
    mp.spawn(_worker, args=(str(tmp_path / "classifier"), str(tmp_path / "pg"), str(tmp_path)),
             nprocs=WORLD, join=True)
    with one_thread():
        single = _evaluate(str(tmp_path / "classifier"), 0, 1)
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert result["local_count"] == len(range(rank, 301, WORLD))  # local states restored
        for ours, theirs in zip(result["histograms"], single["histograms"]):
            assert ours.tolist() == theirs.tolist()
        assert int(result["histograms"][0].sum()) == 301
        torch.testing.assert_close(result["pul"], single["pul"], rtol=0, atol=0)
        for name in FID_STATES:
            torch.testing.assert_close(result["fid_states"][name], single["fid_states"][name],
                                       rtol=1e-12, atol=1e-9)
        torch.testing.assert_close(result["fid"], single["fid"], rtol=1e-5, atol=1e-6)


@pytest.mark.timeout(240)
@pytest.mark.filterwarnings("ignore:.*rank-deficient covariance")
def test_evaluation_under_ddp_spawn_equals_one_process(tmp_path: Path) -> None:
    tiny_classifier(tmp_path / "classifier")
    # Odd sizes give uneven shares; 7 grid images need samples from both ranks, interleaved.
    settings = {"classifier": str(tmp_path / "classifier"), "num_samples": 21, "seed": 3,
                "num_steps": 2, "batch_size": 4, "num_reference": 51, "grid_images": 7}
    data = ForgetSetDataModule(dataset="digits", forget_classes=[0], forget_size=8,
                               eval_size=8, batch_size=8)
    runs = {"single": ("auto", 1), "ddp": (DDPStrategy(start_method="spawn",
                                                       timeout=timedelta(seconds=60)), WORLD)}
    for name, (strategy, devices) in runs.items():
        trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy,
                             logger=False, limit_val_batches=1, enable_progress_bar=False,
                             enable_model_summary=False, enable_checkpointing=False,
                             callbacks=[UnlearningEvaluation(dirpath=name, **settings)])
        with one_thread():
            trainer.validate(TinyUnlearner(), datamodule=data)
    single, ddp = (json.loads((tmp_path / name / "evaluation_step_0000000.json").read_text())
                   for name in runs)
    assert ddp["histograms"] == single["histograms"]
    assert sum(single["histograms"]["original"]) == 21
    assert ddp["metrics"] == pytest.approx(single["metrics"], rel=1e-4, nan_ok=True)
    assert ddp["num_reference"] == single["num_reference"] == 51
    grids = [np.asarray(Image.open(tmp_path / name / "samples_step_0000000.png")) for name in runs]
    np.testing.assert_array_equal(grids[0], grids[1])
