"""PercentUnlearned, UnlearnedFID and PromptCLIPScore against direct computations (or
torchmetrics' own) on the same inputs."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn
from torchmetrics.multimodal import CLIPScore
from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

from evaluation_helpers import one_thread
from tiny_clip import PooledCLIP, save_tiny_clip
from tiny_sd import IMAGE_SIZE
from vdu_lightning import ClassifierModule
from vdu_lightning.metrics import (
    ClassifierFeatures,
    PercentUnlearned,
    PromptCLIPScore,
    UnlearnedFID,
    class_histogram,
    percent_unlearned,
)
from vdu_lightning.metrics import fid as fid_module


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


# ---- PUL ---------------------------------------------------------------------------------
def test_pul_and_histograms_equal_a_direct_count() -> None:
    generator = torch.Generator().manual_seed(0)
    num_classes, forget = 10, [2, 7]
    original = torch.randint(0, num_classes, (500,), generator=generator)
    # The unlearned model makes fewer samples of 2 and 7: some are moved to class 0.
    unlearned = original.clone()
    moved = torch.isin(original, torch.tensor(forget)) & (torch.rand(500, generator=generator)
                                                          < 0.6)
    unlearned[moved] = 0
    metric = PercentUnlearned(num_classes, forget)
    for start in range(0, 500, 128):
        orig, unl = original[start:start + 128], unlearned[start:start + 128]
        if start % 256:  # every other batch as logits: argmax must give the same labels
            orig = nn.functional.one_hot(orig, num_classes).float() * 2 + torch.rand(
                len(orig), num_classes, generator=generator)
        metric.update(orig, unl)
    counts_o, counts_u = Counter(original.tolist()), Counter(unlearned.tolist())
    hist_o, hist_u = metric.histograms()
    assert hist_o.dtype == torch.int64
    assert hist_o.tolist() == [counts_o[c] for c in range(num_classes)]
    assert hist_u.tolist() == [counts_u[c] for c in range(num_classes)]
    n_orig = sum(counts_o[c] for c in forget)
    n_unl = sum(counts_u[c] for c in forget)
    assert 0 < n_unl < n_orig
    assert metric.compute().item() == pytest.approx(100.0 * (n_orig - n_unl) / n_orig)
    torch.testing.assert_close(class_histogram(original, num_classes), hist_o)
    metric.reset()
    assert metric.histograms()[0].sum() == 0


def test_percent_unlearned_edge_cases() -> None:
    assert percent_unlearned(40, 10).item() == pytest.approx(75.0)
    assert percent_unlearned(10, 15).item() == pytest.approx(-50.0)  # more after unlearning
    assert torch.isnan(percent_unlearned(0, 0)) and torch.isnan(percent_unlearned(0, 3))
    with pytest.raises(ValueError, match="non-negative"):
        percent_unlearned(-1, 0)
    # The original never made the forgotten class: undefined, nan.
    metric = PercentUnlearned(3, [2])
    metric.update(torch.tensor([0, 1, 1]), torch.tensor([2, 1, 0]))
    assert torch.isnan(metric.compute())


def test_pul_rejects_bad_arguments_and_inputs() -> None:
    with pytest.raises(ValueError, match=r"forget_classes \[10\] are outside"):
        PercentUnlearned(10, [3, 10])
    with pytest.raises(ValueError, match="forget_classes is empty"):
        PercentUnlearned(10, [])
    with pytest.raises(ValueError, match="num_classes must be"):
        PercentUnlearned(1, [0])
    metric = PercentUnlearned(4, [1])
    with pytest.raises(ValueError, match="paired: got 3 original and 2 unlearned"):
        metric.update(torch.tensor([0, 1, 2]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"unlearned_preds holds labels \[-1, 7\]"):
        metric.update(torch.tensor([0, 1, 2]), torch.tensor([7, -1, 2]))
    with pytest.raises(ValueError, match="scores for 5 classes"):
        metric.update(torch.zeros(2, 5), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="integer class indices"):
        metric.update(torch.tensor([0.0, 1.0]), torch.tensor([0, 1]))
    assert metric.histograms()[0].sum() == 0  # nothing was counted by the failed updates


# ---- FID ---------------------------------------------------------------------------------
def _classifier() -> ClassifierModule:
    """A small random classifier (32-d features) whose features spread enough to compare."""
    torch.manual_seed(0)
    classifier = ClassifierModule(in_channels=1, num_classes=10, width=8)
    with torch.no_grad():
        for module in classifier.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_var.fill_(0.01)
    return classifier.eval()


def _fid_by_hand(real: np.ndarray, fake: np.ndarray) -> float:
    mu_r, mu_f = real.mean(axis=0), fake.mean(axis=0)
    cov_r, cov_f = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    covmean = scipy.linalg.sqrtm(cov_r @ cov_f).real
    return float(((mu_r - mu_f) ** 2).sum() + np.trace(cov_r + cov_f - 2 * covmean))


def test_fid_equals_a_scipy_computation_on_the_same_features() -> None:
    classifier = _classifier()
    generator = torch.Generator().manual_seed(1)
    real = torch.rand(300, 1, 8, 8, generator=generator) * 2 - 1
    # Two fake sets of different texture (uniform and sparse binary pixels): the classifier
    # standardises each image, so a set that differed only in scale would look the same.
    uniform = torch.rand(200, 1, 8, 8, generator=generator) - 0.3
    sparse = (torch.rand(200, 1, 8, 8, generator=generator) > 0.8).float() * 2 - 1
    fakes = [uniform, sparse]
    fid = UnlearnedFID(classifier=classifier)
    for chunk in real.split(64):
        fid.update(chunk, real=True)
    features = ClassifierFeatures(classifier)
    real_features = features(real).double().numpy()
    values = []
    for fake in fakes:
        for chunk in fake.split(64):
            fid.update(chunk, real=False)
        value = fid.compute()
        assert value.dtype == torch.float32
        expected = _fid_by_hand(real_features, features(fake).double().numpy())
        assert value.item() == pytest.approx(expected, rel=1e-4)
        values.append(value.item())
        fid.reset()  # keeps the real statistics: the second fake set needs no real update
    assert int(fid.real_features_num_samples) == 300 and int(fid.fake_features_num_samples) == 0
    assert values[0] != pytest.approx(values[1], rel=1e-2)
    assert values[0] > 1.0  # a real distance, not a value lost in rounding


def test_fid_needs_two_samples_and_warns_on_rank_deficient_covariance() -> None:
    fid = UnlearnedFID(classifier=_classifier())
    fid.update(torch.rand(40, 1, 8, 8) * 2 - 1, real=True)
    fid.update(torch.rand(1, 1, 8, 8) * 2 - 1, real=False)
    with pytest.raises(RuntimeError, match="More than one sample"):
        fid.compute()
    fid.update(torch.rand(9, 1, 8, 8) * 2 - 1, real=False)
    with pytest.warns(UserWarning, match="10 samples for 32-d features"):
        fid.compute()
    with pytest.raises(ValueError, match="float"):
        fid.update(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), real=False)


def test_fid_name_and_arguments() -> None:
    classifier = _classifier()
    assert UnlearnedFID(classifier=classifier).name == "u_fid/classifier/ddim50"
    fid = UnlearnedFID(classifier=classifier, sampler="ddpm", num_steps=1000,
                       reset_real_features=True)
    assert fid.name == "u_fid/classifier/ddpm1000" and fid.reset_real_features
    with pytest.raises(ValueError, match="exactly one feature source"):
        UnlearnedFID()
    with pytest.raises(ValueError, match="exactly one feature source"):
        UnlearnedFID(classifier=classifier, inception_weights="w.pth")
    with pytest.raises(TypeError, match="instead of feature"):
        UnlearnedFID(classifier=classifier, feature=64)
    with pytest.raises(ValueError, match="num_steps must be a positive int, got 0"):
        UnlearnedFID(classifier=classifier, num_steps=0)


def test_classifier_features_stay_frozen_and_float32() -> None:
    classifier = ClassifierModule(in_channels=1, width=8).train()
    features = ClassifierFeatures(classifier).train()
    assert not features.training and not classifier.training
    assert not any(p.requires_grad for p in features.parameters())
    images = torch.rand(4, 1, 8, 8) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = features(images)
    assert out.dtype == torch.float32 and not out.requires_grad
    torch.testing.assert_close(out, classifier.features(images))
    with pytest.raises(ValueError, match="1-channel images, got 3"):
        features(torch.zeros(2, 3, 8, 8))


def test_missing_inception_weights_file_is_named() -> None:
    with pytest.raises(FileNotFoundError, match="missing/inception.pth"):
        UnlearnedFID(inception_weights="missing/inception.pth")


@pytest.mark.skipif(_TORCH_FIDELITY_AVAILABLE, reason="torch-fidelity is installed")
def test_inception_without_torch_fidelity_says_what_to_install(tmp_path: Path) -> None:
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"")
    with pytest.raises(ImportError, match="pip install torch-fidelity"):
        UnlearnedFID(inception_weights=weights)


class _RecordingInception(nn.Module):
    """Stands in for torch-fidelity's network: records its input, returns 2048 features."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[torch.Tensor] = []

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        self.inputs.append(pixels)
        return pixels.double().mean(dim=(1, 2, 3))[:, None].expand(-1, 2048)


def test_inception_features_get_uint8_rgb(monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path) -> None:
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"")
    network = _RecordingInception()
    monkeypatch.setattr(fid_module, "_TORCH_FIDELITY_AVAILABLE", True)
    monkeypatch.setattr(fid_module, "_build_inception", lambda path, feature: network)
    fid = UnlearnedFID(inception_weights=weights, num_steps=20)
    assert fid.name == "u_fid/inception/ddim20"
    grey = torch.tensor([-1.0, 0.0, 1.0, 1.5]).reshape(1, 1, 2, 2)
    fid.update(grey, real=True)
    pixels = network.inputs[-1]
    assert pixels.dtype == torch.uint8 and pixels.shape == (1, 3, 2, 2)
    assert pixels[0, :, 0, 0].tolist() == [0, 0, 0] and pixels[0, 1].flatten().tolist() == [
        0, 128, 255, 255]
    assert fid.real_features_sum.dtype == torch.float64 and fid.real_features_sum.shape == (2048,)


# ---- CLIP score --------------------------------------------------------------------------
PROMPTS = ["a red barn", "a blue sea", "a red car", "a green tree", "a dark night"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, object]:
    """The tiny CLIP model and processor of the text-to-image tests, read back from disk."""
    from transformers import CLIPModel, CLIPProcessor

    path = save_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")
    return (CLIPModel.from_pretrained(path, local_files_only=True),
            CLIPProcessor.from_pretrained(path, local_files_only=True))


def _pictures(count: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)


def test_the_clip_score_equals_torchmetrics_on_the_same_images(clip: tuple) -> None:
    model, processor = clip
    images = _pictures(len(PROMPTS))
    metric = PromptCLIPScore(model, processor)
    metric.update(images, PROMPTS)
    theirs = CLIPScore(lambda: (PooledCLIP(model), processor))
    theirs.update(list((images * 255).round().to(torch.uint8)), PROMPTS)
    value = metric.compute()
    assert value.dtype == torch.float64 and int(metric.num_images) == len(PROMPTS)
    # The sum of the per-image scores is not clipped: comparing it checks every image.
    assert float(metric.score_sum) == pytest.approx(float(theirs.score), abs=1e-4)
    assert float(value) == pytest.approx(float(theirs.compute()), abs=1e-4)
    scores = metric.image_scores(images, PROMPTS)
    assert scores.shape == (len(PROMPTS),) and len(set(scores.tolist())) == len(PROMPTS)
    assert float(scores.sum()) == float(metric.score_sum)


def test_the_clip_score_accumulates_over_updates_and_processes(clip: tuple) -> None:
    images = _pictures(len(PROMPTS), seed=1)
    whole = PromptCLIPScore(*clip)
    whole.update(images, PROMPTS)
    batches = PromptCLIPScore(*clip)
    batches.update(images[:2], PROMPTS[:2])
    batches.update(images[2:], PROMPTS[2:])
    assert int(batches.num_images) == len(PROMPTS)
    # Other batch compositions round differently in CLIP's kernels: equal up to that.
    assert float(batches.compute()) == pytest.approx(float(whole.compute()), rel=1e-6)
    # Two processes' states, reduced as under DDP (dist_reduce_fx="sum"), give the same.
    first, second = PromptCLIPScore(*clip), PromptCLIPScore(*clip)
    first.update(images[:3], PROMPTS[:3])
    second.update(images[3:], PROMPTS[3:])
    first.merge_state(second)
    assert int(first.num_images) == len(PROMPTS)
    assert float(first.compute()) == pytest.approx(float(whole.compute()), rel=1e-6)
    # Scores computed once and given back count as the images they came from, exactly.
    given = PromptCLIPScore(*clip)
    given.update(scores=whole.image_scores(images, PROMPTS))
    assert float(given.compute()) == float(whole.compute())
    whole.reset()
    assert int(whole.num_images) == 0 and float(whole.score_sum) == 0.0


def test_the_clip_score_clips_the_mean_not_each_image(clip: tuple) -> None:
    metric = PromptCLIPScore(*clip)
    metric.update(scores=torch.tensor([-30.0, 50.0], dtype=torch.float64))
    assert float(metric.compute()) == 10.0  # each image clipped first would give 25
    metric.update(scores=torch.tensor([-100.0], dtype=torch.float64))
    assert float(metric.compute()) == 0.0  # mean -80 / 3: clipped at 0
    assert float(metric.score_sum) == -80.0


def test_the_clip_score_keeps_clip_frozen_and_refuses_what_does_not_fit(clip: tuple) -> None:
    model, processor = clip
    metric = PromptCLIPScore(model, processor).train()
    assert not metric.model.training  # CLIP's dropout must not move the scores
    assert not any(p.requires_grad for p in metric.model.parameters())
    with pytest.raises(ValueError, match="one prompt \\(a str\\) per image: 2 images"):
        metric.update(_pictures(2), ["a red barn"])
    with pytest.raises(ValueError, match=r"float \[B, 3, H, W\] tensor"):
        metric.update(_pictures(2)[:, :1], ["a", "b"])
    with pytest.raises(TypeError, match="images and prompts, or scores, not both"):
        metric.update(_pictures(1), ["a"], scores=torch.zeros(1))
    with pytest.raises(TypeError, match="CLIP nn.Module"):
        PromptCLIPScore(nn.Linear(2, 2), processor)
    assert int(metric.num_images) == 0  # nothing was counted by the failed updates
