"""``vdu fit ... --trainer.strategy=ddp --trainer.devices=2`` in a subprocess (gloo on CPU).

Each rank writes what it saw (``probes.RankProbe``): the ranks must end with identical
weights, draw different noise and timesteps, keep the prior out of what DDP broadcasts, and
two runs with the same seed must agree exactly, with one process and with two.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from unlearning_runs import run_vdu, tiny_job
from vdu_lightning.cli import main

pytestmark = pytest.mark.timeout(400)
STEPS = 6
DDP = ("--trainer.strategy=ddp", "--trainer.devices=2")


def _probe(directory: Path, rank: int) -> dict:
    return torch.load(directory / "probe" / f"rank{rank}.pt", weights_only=True)


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two DDP runs and two single-process runs of the same job, each in its own folder."""
    root = tmp_path_factory.mktemp("ddp_cli")
    probe = {"class_path": "probes.RankProbe", "init_args": {"out_dir": "probe"}}
    config = tiny_job(root, max_steps=STEPS, callbacks=[probe])
    for name in ("ddp_a", "ddp_b", "single_a", "single_b"):
        (root / name).mkdir()
    for name in ("ddp_a", "ddp_b"):
        run_vdu("fit", "--config", str(config), *DDP, cwd=root / name)
    return root


def test_every_rank_ends_with_the_same_weights_after_distinct_noise(runs: Path) -> None:
    ranks = [_probe(runs / "ddp_a", rank) for rank in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["global_step"] for r in ranks] == [STEPS, STEPS]
    assert ranks[0]["wrapper"] == "DistributedDataParallel"
    _assert_same_weights(ranks[0]["weights"], ranks[1]["weights"])
    # Seeded alike (weights must agree), but noise and timesteps come from per-rank streams.
    assert not torch.equal(ranks[0]["noise"], ranks[1]["noise"])
    assert not torch.equal(ranks[0]["timesteps"], ranks[1]["timesteps"])


def test_the_prior_is_identical_on_every_rank_and_never_broadcast(runs: Path) -> None:
    ranks = [_probe(runs / "ddp_a", rank) for rank in (0, 1)]
    for rank in ranks:
        # DDP re-sends module buffers before every forward pass: the prior is not one, and
        # its tensors are the ones built at setup, untouched until the end.
        assert not [n for n in rank["buffer_names"] if "prior" in n]
        assert rank["prior_numel"] > 0 and rank["prior_tensors_kept"]
    _assert_same_weights(ranks[0]["prior_var"], ranks[1]["prior_var"])


def test_the_same_seed_gives_identical_runs_with_two_processes(runs: Path) -> None:
    for rank in (0, 1):
        a, b = _probe(runs / "ddp_a", rank), _probe(runs / "ddp_b", rank)
        _assert_same_weights(a["weights"], b["weights"])
        assert torch.equal(a["noise"], b["noise"])


def test_the_same_seed_gives_identical_runs_with_one_process(
        runs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("single_a", "single_b"):
        monkeypatch.chdir(runs / name)
        main(["fit", "--config", str(runs / "job.yaml")])
    a, b = _probe(runs / "single_a", 0), _probe(runs / "single_b", 0)
    assert a["world_size"] == 1 and a["global_step"] == STEPS
    _assert_same_weights(a["weights"], b["weights"])
    # One process is not two: its weights differ from the DDP run's (other batches, noise).
    assert not torch.equal(a["weights"]["conv_in.weight"],
                           _probe(runs / "ddp_a", 0)["weights"]["conv_in.weight"])
