"""benchmarks/unlearning.py end to end on a tiny model: every field of its table is filled."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import torch

from conftest import REPO
from vdu_lightning import ClassifierModule, DiffusionModule, ParameterPrior


def test_the_benchmark_runs_two_methods_and_writes_table_and_scatter(
        tmp_path: Path, tiny_unet_config: dict) -> None:
    torch.manual_seed(0)
    model = DiffusionModule(unet=tiny_unet_config, num_train_timesteps=100, sample_steps=2)
    model.save_pretrained(tmp_path / "ddpm")
    ClassifierModule(in_channels=1, num_classes=10).save_pretrained(tmp_path / "classifier")
    ClassifierModule(in_channels=1, num_classes=10, width=8, architecture="lenet"
                     ).save_pretrained(tmp_path / "second")
    snapshots = [{n: p.detach() + 1e-2 * torch.randn(p.shape)
                  for n, p in model.unet.named_parameters()} for _ in range(2)]
    ParameterPrior.from_tensors(snapshots, "independent").save(tmp_path / "prior.safetensors")

    command = [
        sys.executable, str(REPO / "benchmarks" / "unlearning.py"),
        "--methods", "vdu", "gradient_ascent", "--seeds", "0", "1", "--workers", "2",
        "--pretrained", str(tmp_path / "ddpm"),
        "--classifiers", str(tmp_path / "classifier"), str(tmp_path / "second"),
        "--prior", str(tmp_path / "prior.safetensors"), "--max-steps", "2",
        "--num-samples", "8", "--sample-steps", "2",
        "--data-overrides", json.dumps({"image_size": 8, "forget_size": 16, "batch_size": 8}),
        "--out", str(tmp_path / "bench.json"), "--plot", str(tmp_path / "scatter.png")]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    assert [(r["method"], r["seed"]) for r in report["runs"]] == [
        ("vdu", 0), ("gradient_ascent", 0), ("vdu", 1), ("gradient_ascent", 1)]
    for run in report["runs"]:
        assert run["steps"] == 2 and run["data_constrained"]
        assert run["train_seconds"] > 0 and run["peak_memory_mb"] > 0
        assert math.isfinite(run["u_fid"]) and run["u_fid"] > 0
        assert 0.0 <= run["retained_drift"] <= 1.0
        assert sum(run["histogram_unlearned"]) == 8
        assert list(run["paired"]["evaluators"]) == ["classifier", "second"]
        assert math.isfinite(run["second_u_fid_ratio"])
        both = all(math.isfinite(run[key]) for key in ("pul", "second_pul"))
        assert (run["pul_disagreement"] is not None) == both
        for key in ("bpd_forget_increase", "bpd_retain_increase", "background_shift",
                    "change_retained"):
            assert math.isfinite(run[key]), key
        # The held-out images of the forgotten digit (50) and of the retained ones (450).
        assert 0 < run["likelihood"]["forget"]["images"] <= run["likelihood"]["retain"]["images"]
    assert [row["method"] for row in report["summary"]] == ["vdu", "gradient_ascent"]
    assert "| vdu | D_f only |" in report["table"]
    # A row per method in both tables: the evaluators' and the classifier-free measures'.
    assert report["table"].count("| gradient_ascent | ") == 2
    assert (tmp_path / "scatter.png").stat().st_size > 1000


def test_the_benchmark_distils_sfd_and_sid_and_scores_them_against_the_teacher(
        tmp_path: Path, tiny_unet_config: dict) -> None:
    torch.manual_seed(0)
    teacher = DiffusionModule(unet=tiny_unet_config, num_classes=10, num_train_timesteps=100)
    teacher.save_pretrained(tmp_path / "teacher")
    # Where sfd.yaml's pseudo-label override reads it (the run's directory is tmp_path).
    classifier = tmp_path / "runs/mnist5k/classifier"
    ClassifierModule(in_channels=1, num_classes=10).save_pretrained(classifier)
    small = {"t_min": 5, "t_max": 80, "t_init": 50, "batch_size": 4}
    command = [
        sys.executable, str(REPO / "benchmarks" / "unlearning.py"),
        "--methods", "sfd", "sid", "--seeds", "0", "--teacher", str(tmp_path / "teacher"),
        "--classifiers", str(classifier), "--distill-steps", "4",
        "--num-per-label", "3", "--distill-overrides", json.dumps(small),
        "--out", str(tmp_path / "bench.json")]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    assert [r["method"] for r in report["runs"]] == ["sfd", "sid"]
    for run in report["runs"]:
        assert run["iterations"] == 2
        for sampler in ("one_step", "teacher"):
            scores = run[sampler]
            assert 0 <= scores["ua"] <= 100 and 0 <= scores["class_consistency"] <= 100
            assert sum(scores["forgotten_drawn_as"]) == 3  # the 3 samples of label 1
            assert math.isfinite(scores["u_fid"]) and scores["u_fid"] > 0
            assert "second_ua" not in scores  # one evaluator given: no second column
        assert run["speed"]["speedup"] > 1  # one network call against fifty
        assert (tmp_path / "bench" / f"{run['method']}_seed0" / "model_index.json").is_file()
        assert (tmp_path / "bench" / f"{run['method']}_seed0.png").stat().st_size > 100
    assert run["hyperparameters"]["forget_classes"] == []  # sid distils every label
    assert "| sfd, one step | 0 |" in report["table"]
    assert "| teacher, DDIM-50 | — |" in report["table"]
