"""The metrics and the evaluation callback under real DDP (two CPU processes, gloo).

Summed over two ranks, each holding its share of the samples, the states and values must
equal those of one process holding them all. One ``ddp_spawn`` validation run serves both
tests: starting the processes costs more than the work.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy
from PIL import Image

from evaluation_helpers import TinyUnlearner, one_thread, tiny_classifier
from vdu_lightning import ClassifierModule, ForgetSetDataModule
from vdu_lightning.callbacks.evaluation import UnlearningEvaluation
from vdu_lightning.metrics import PercentUnlearned, UnlearnedFID

# The whole module under one limit (the processes start in a fixture); the tiny samples are
# fewer than the feature dimensions, which is expected here.
pytestmark = [pytest.mark.timeout(240),
              pytest.mark.filterwarnings("ignore:.*rank-deficient covariance")]
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


class MetricProbe(pl.Callback):
    """Runs ``_evaluate`` on every rank of the run and saves what each rank got."""

    def __init__(self, classifier_dir: str, out_dir: str) -> None:
        self.classifier_dir, self.out_dir = classifier_dir, out_dir

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        result = _evaluate(self.classifier_dir, trainer.global_rank, trainer.world_size)
        Path(self.out_dir).mkdir(exist_ok=True)
        torch.save(result, Path(self.out_dir) / f"rank{trainer.global_rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One single-process and one 2-process validation, files in ``<root>/{single,ddp}``."""
    root = tmp_path_factory.mktemp("ddp")
    tiny_classifier(root / "classifier")
    # Odd sizes give uneven shares; 7 grid images need samples from both ranks, interleaved.
    settings = {"classifier": str(root / "classifier"), "num_samples": 21, "seed": 3,
                "num_steps": 2, "batch_size": 4, "num_reference": 51, "grid_images": 7}
    data = ForgetSetDataModule(dataset="digits", forget_classes=[0], forget_size=8,
                               eval_size=8, batch_size=8)
    # A timeout so that a rank stuck in a collective fails the run instead of hanging it.
    ddp = DDPStrategy(start_method="spawn", timeout=timedelta(seconds=60))
    for name, strategy, devices in (("single", "auto", 1), ("ddp", ddp, WORLD)):
        out = str(root / name)
        trainer = pl.Trainer(
            accelerator="cpu", devices=devices, strategy=strategy, logger=False,
            limit_val_batches=1, enable_progress_bar=False, enable_model_summary=False,
            enable_checkpointing=False,
            callbacks=[UnlearningEvaluation(dirpath=out, **settings),
                       MetricProbe(str(root / "classifier"), out)],
        )
        with one_thread():
            trainer.validate(TinyUnlearner(), datamodule=data)
    return root


def test_metric_states_summed_over_ranks_equal_one_process(runs: Path) -> None:
    single = torch.load(runs / "single" / "rank0.pt", weights_only=True)
    assert int(single["histograms"][0].sum()) == 301
    for rank in range(WORLD):
        result = torch.load(runs / "ddp" / f"rank{rank}.pt", weights_only=True)
        assert result["local_count"] == len(range(rank, 301, WORLD))  # local states restored
        for ours, theirs in zip(result["histograms"], single["histograms"]):
            assert ours.tolist() == theirs.tolist()
        torch.testing.assert_close(result["pul"], single["pul"], rtol=0, atol=0)
        for name in FID_STATES:
            torch.testing.assert_close(result["fid_states"][name], single["fid_states"][name],
                                       rtol=1e-12, atol=1e-9)
        torch.testing.assert_close(result["fid"], single["fid"], rtol=1e-5, atol=1e-6)


def test_evaluation_under_ddp_spawn_equals_one_process(runs: Path) -> None:
    single, ddp = (json.loads((runs / name / "evaluation_step_0000000.json").read_text())
                   for name in ("single", "ddp"))
    assert ddp["histograms"] == single["histograms"]
    assert sum(single["histograms"]["original"]) == 21
    assert ddp["metrics"] == pytest.approx(single["metrics"], rel=1e-4, nan_ok=True)
    assert ddp["num_reference"] == single["num_reference"] == 51
    grids = [np.asarray(Image.open(runs / name / "samples_step_0000000.png"))
             for name in ("single", "ddp")]
    np.testing.assert_array_equal(grids[0], grids[1])
