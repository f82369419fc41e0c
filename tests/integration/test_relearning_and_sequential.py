"""The relearning attack (``vdu relearn``, benchmarks/relearning.py) and repeated forgetting
(benchmarks/sequential.py) end to end on a tiny 16×16 model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import REPO, TINY_UNET
from vdu_lightning import ClassifierModule, DiffusionModule, ParameterPrior
from vdu_lightning.cli import main
from vdu_lightning.diffusion import load_pretrained, sample_in_batches, seeded_noise
from vdu_lightning.evaluation import load_classifier
from vdu_lightning.relearn import forget_images, forgotten_share


def biased_classifier(path: Path, favourite: int, architecture: str = "vgg") -> Path:
    """A classifier that reads (nearly) every image as ``favourite``."""
    torch.manual_seed(0)
    classifier = ClassifierModule(in_channels=1, num_classes=10, width=8,
                                  architecture=architecture)
    last = [m for m in classifier.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.bias[favourite] = 1e3
    classifier.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("relearn")
    torch.manual_seed(0)
    model = DiffusionModule(unet={**TINY_UNET, "sample_size": 16},
                            num_train_timesteps=100, sample_steps=2)
    model.save_pretrained(root / "ddpm")
    biased_classifier(root / "ones", 1)
    biased_classifier(root / "threes", 3, "lenet")
    snapshots = [{n: p.detach() + 1e-2 * torch.randn(p.shape)
                  for n, p in model.unet.named_parameters()} for _ in range(2)]
    ParameterPrior.from_tensors(snapshots, "independent").save(root / "prior.safetensors")
    return root


def relearn(world: Path, out: Path, *extra: str) -> None:
    main(["relearn", "--model", str(world / "ddpm"), "--classifier", str(world / "ones"),
          "--forget-class", "1", "--k", "4", "--steps", "4", "--every", "2",
          "--num-samples", "8", "--sample-steps", "2", "--accelerator", "cpu",
          "--out", str(out), *extra])


def test_relearn_tracks_the_share_and_the_steps_to_half_the_originals(world: Path,
                                                                      tmp_path: Path) -> None:
    out = tmp_path / "curve.json"
    relearn(world, out, "--original", str(world / "ddpm"))
    result = json.loads(out.read_text())
    assert [p["step"] for p in result["curve"]] == [0, 2, 4]
    # Every sample reads as a 1, before and after: the original's share, and the target
    # (half of it) reached before the first step.
    assert result["original_share"] == 1.0 and result["steps_to_recover"] == 0
    assert all(p["share"] == 1.0 for p in result["curve"])
    assert (result["k"], result["forget_classes"]) == (4, [1])


def test_the_share_is_what_the_classifier_reads_in_the_seeded_samples(world: Path) -> None:
    unet, scheduler = load_pretrained(world / "ddpm")
    classifier = load_classifier(world / "threes")
    images = sample_in_batches(unet, scheduler.config, seeded_noise(6, (1, 16, 16), 0), 2)
    read = classifier.predict(images)[0]
    expected = float(torch.isin(read, torch.tensor([3, 5])).float().mean())
    assert forgotten_share(unet, scheduler.config, classifier, [3, 5], 6, 2) == expected
    assert forgotten_share(unet, scheduler.config, classifier, [1], 6, 2) == 0.0


def test_the_attackers_images_are_k_of_the_forgotten_class_chosen_by_the_seed() -> None:
    first, again, other = (forget_images("digits", [1], 5, seed) for seed in (0, 0, 1))
    assert first.shape == (5, 1, 8, 8) and torch.equal(first, again)
    assert forget_images("digits", [1], 5, 0, image_size=16).shape == (5, 1, 16, 16)
    assert not torch.equal(first, other)
    with pytest.raises(ValueError, match="fewer than k=100000"):
        forget_images("digits", [1], 100000, 0)


def test_relearn_refuses_an_original_without_the_class_and_bad_counts(
        world: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["relearn", "--model", str(world / "ddpm"), "--original", str(world / "ddpm"),
              "--classifier", str(world / "threes"), "--forget-class", "1", "--k", "2",
              "--steps", "2", "--num-samples", "8", "--sample-steps", "2",
              "--out", str(tmp_path / "r.json")])
    assert stopped.value.code == 2 and "draws no image of classes [1]" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()
    with pytest.raises(SystemExit):
        relearn(world, tmp_path / "r.json", "--every", "0")
    assert "--every must be at least 1" in capsys.readouterr().err


def run_script(script: str, *arguments: str, cwd: Path) -> str:
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *arguments],
                          capture_output=True, text=True, cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_the_relearning_benchmark_attacks_every_model_and_tabulates(
        world: Path, tmp_path: Path) -> None:
    out = tmp_path / "relearning.json"
    arguments = ["--original", str(world / "ddpm"), "--models", f"copy={world / 'ddpm'}",
                 "--classifier", str(world / "ones"), "--k", "2", "4", "--seeds", "0",
                 "--steps", "2", "--at", "0", "1", "--num-samples", "8", "--sample-steps", "2",
                 "--workers", "2", "--out", str(out)]
    printed = run_script("relearning.py", *arguments, "--grid", str(tmp_path / "grid.png"),
                         cwd=tmp_path)
    report = json.loads(out.read_text())
    assert len(report["runs"]) == 4
    assert {r["name"] for r in report["runs"]} == {"original", "copy"}
    assert "| original | 100.0 | 0 ± 0 | 100 ± 0 | 0 ± 0 | 100 ± 0 |" in printed
    # The picture: a row per (model, 0/2/5 attack steps), 32 images of 16 px (+1 px gaps), x2.
    assert Image.open(tmp_path / "grid.png").size == (2 * (32 * 17 + 1), 2 * (6 * 17 + 1))
    assert "grid: copy after 5 steps: 8 of 8 read as 1" in printed
    runs = sorted(p.name for p in (tmp_path / "relearning").glob("*.json"))
    assert runs == ["copy_k2_seed0.json", "copy_k4_seed0.json", "original_k2_seed0.json",
                    "original_k4_seed0.json"]
    # A rerun reads the runs it finds instead of repeating them.
    copy = tmp_path / "relearning" / "copy_k2_seed0.json"
    copy.write_text(json.dumps({**json.loads(copy.read_text()), "steps_to_recover": None}))
    assert "| copy | 100.0 | > 2 |" in run_script("relearning.py", *arguments, cwd=tmp_path)


def test_the_sequential_benchmark_forgets_one_digit_then_another_and_both(
        world: Path, tmp_path: Path) -> None:
    out = tmp_path / "sequential.json"
    run_script("sequential.py", "--original", str(world / "ddpm"), "--prior",
               str(world / "prior.safetensors"), "--classifiers", str(world / "ones"),
               str(world / "threes"), "--seeds", "0", "--num-samples", "8", "--max-steps", "2",
               "--workers", "2", "--out", str(out), cwd=tmp_path)
    report = json.loads(out.read_text())
    assert [r["run"] for r in report["rows"]] == [
        "first", "then-original-prior", "then-recentred-prior", "both", "B-alone"]
    folder = tmp_path / "sequential" / "seed0"
    assert (folder / "first" / "unet").is_dir()  # the first run's model, exported
    runs = {name: json.loads((folder / f"{name}.json").read_text())
            for name in ("first", "then-recentred-prior", "both", "B-alone")}
    assert runs["then-recentred-prior"]["args"]["pretrained"] == str(folder / "first")
    assert runs["then-recentred-prior"]["args"]["original"] == str(world / "ddpm")
    assert runs["then-recentred-prior"]["args"]["prior_mean"] == "start"
    assert runs["both"]["args"]["forget_class"] == [1, 7]
    assert runs["B-alone"]["args"]["forget_class"] == [7]
    # Every run is evaluated with both digits forgotten: the same eight retained digits.
    assert all(r["args"]["evaluate_classes"] == [1, 7] for r in runs.values())
    assert "| run | PUL digit 1 (%) | PUL digit 7 (%) |" in report["table"]
