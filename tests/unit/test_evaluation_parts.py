"""The plain-torch parts of the evaluation: the evaluator network and its directory, the
photometric changes, the variational bound, the paired comparison, the controls, the grid
and the cache of the original's results."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DModel
from safetensors.torch import save_file

from conftest import REPO, TINY_UNET
from vdu_lightning.data.embedded import load_digits
from vdu_lightning.evaluation import (
    ClassifierNet,
    PairedEvaluation,
    before_after_grid,
    haze_control,
    load_classifier,
    perfect_forgetter_control,
    save_classifier,
    variational_bound,
)
from vdu_lightning.evaluation.cache import OriginalCache, state_digest
from vdu_lightning.evaluation.likelihood import (
    Likelihood,
    discretised_gaussian_log_likelihood,
    image_generator,
    likelihood_change,
    quantise,
    stratified_timesteps,
)
from vdu_lightning.evaluation.paired import intensity, retained_drift, sample_change
from vdu_lightning.evaluation.photometric import (
    augment,
    box_blur,
    contrast,
    gaussian_noise,
    offset,
)

BETAS = torch.linspace(1e-4, 0.02, 1000)


def _digits(count: int = 64) -> torch.Tensor:
    return load_digits(16).images[:count]


# ---- the evaluator network -----------------------------------------------------------------
@pytest.mark.parametrize("architecture", ["vgg", "lenet"])
def test_the_evaluator_is_blind_to_offset_and_contrast_by_construction(architecture: str
                                                                       ) -> None:
    torch.manual_seed(0)
    net = ClassifierNet(width=8, architecture=architecture).eval()
    images = _digits()
    logits = net(images)
    for changed in (images + 0.2, images - 0.3, 0.6 * images + 0.1):  # unclipped: exact
        torch.testing.assert_close(net(changed), logits, atol=2e-4, rtol=1e-4)
    # Without standardisation the same network reads them differently.
    blind = ClassifierNet(width=8, architecture=architecture, normalise=False).eval()
    blind.load_state_dict(net.state_dict())
    assert not torch.allclose(blind(images + 0.2), blind(images), atol=1e-3)


def test_a_blank_image_is_not_blown_up_into_noise() -> None:
    from vdu_lightning.evaluation.classifier import standardise

    nearly_blank = -1 + 1e-4 * torch.randn(2, 1, 16, 16)
    assert standardise(nearly_blank).abs().max() < 0.1


def test_predict_gives_labels_and_confidences_in_eval_mode() -> None:
    net = ClassifierNet(width=8).train()
    labels, confidence = net.predict(_digits(10), batch_size=3)
    assert labels.shape == confidence.shape == (10,) and net.training
    assert ((0 < confidence) & (confidence <= 1)).all()
    torch.testing.assert_close(labels, net.eval()(_digits(10)).argmax(1))


def test_a_classifier_directory_round_trips(tmp_path: Path) -> None:
    net = ClassifierNet(width=8, architecture="lenet", dropout=0.1).eval()
    save_classifier(net, tmp_path / "c")
    loaded = load_classifier(tmp_path / "c")
    assert loaded.config == net.config and not loaded.training
    torch.testing.assert_close(loaded(_digits(4)), net(_digits(4)), atol=0, rtol=0)


def test_a_classifier_directory_that_does_not_fit_is_refused_by_name(tmp_path: Path) -> None:
    save_classifier(ClassifierNet(width=8), tmp_path / "good")

    def variant(name: str, config: object = None, weights: bytes | None = None) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        good = json.loads((tmp_path / "good" / "config.json").read_text())
        text = config if isinstance(config, str) else json.dumps(
            good if config is None else config)
        (folder / "config.json").write_text(text)
        (folder / "model.safetensors").write_bytes(
            (tmp_path / "good" / "model.safetensors").read_bytes() if weights is None
            else weights)
        return folder

    good = json.loads((tmp_path / "good" / "config.json").read_text())
    cases = [
        (variant("pickled", weights=b"\x80\x04not safetensors"), "is not a safetensors file"),
        (variant("wider", {**good, "width": 16}), "do not fit its config.json"),
        (variant("lenet", {**good, "architecture": "lenet"}), "do not fit its config.json"),
        (variant("foreign", {**good, "colour": "red"}), r"has keys \['colour'\]"),
        (variant("old", {k: v for k, v in good.items() if k != "normalise"}),
         "without input standardisation"),
        (variant("notjson", "{width: 8"), "is not valid JSON"),
        (variant("list", [1, 2]), "must hold a JSON object"),
        (variant("classes", {**good, "num_classes": 1}), "does not describe a classifier"),
    ]
    for folder, message in cases:
        with pytest.raises(ValueError, match=message):
            load_classifier(folder)
    with pytest.raises(FileNotFoundError, match="classifier directory not found"):
        load_classifier(tmp_path / "missing")
    (tmp_path / "good" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        load_classifier(tmp_path / "good")


def test_weights_of_another_network_are_refused(tmp_path: Path) -> None:
    save_classifier(ClassifierNet(width=8), tmp_path / "c")
    save_file({"conv.weight": torch.zeros(3)}, str(tmp_path / "c" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing \[.*unexpected \['conv.weight'\]"):
        load_classifier(tmp_path / "c")


# ---- photometric changes --------------------------------------------------------------------
def test_the_perturbations_do_what_they_say() -> None:
    images = _digits()
    assert offset(images, 0.3).max() <= 1 and offset(images, -0.3).min() >= -1
    torch.testing.assert_close(offset(images, 0.1)[images < 0.8], images[images < 0.8] + 0.1)
    dim = contrast(images, 0.5)
    torch.testing.assert_close(dim.flatten(1).mean(1), images.flatten(1).mean(1))
    assert dim.flatten(1).std(1).mean() < images.flatten(1).std(1).mean()
    flat = torch.full((2, 1, 6, 6), 0.25)
    torch.testing.assert_close(box_blur(flat), flat)
    noisy = gaussian_noise(torch.zeros(4, 1, 64, 64), 0.1, torch.Generator().manual_seed(0))
    assert abs(float(noisy.std()) - 0.1) < 0.005


def test_the_augmentation_is_seeded_varied_and_in_range() -> None:
    images = _digits()
    first = augment(images, generator=torch.Generator().manual_seed(1))
    again = augment(images, generator=torch.Generator().manual_seed(1))
    other = augment(images, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(first, again)
    assert not torch.allclose(first, other)
    assert first.shape == images.shape and first.min() >= -1 and first.max() <= 1
    assert (first != images).flatten(1).any(1).all()
    # Noise and blur each reach about half the images: without a shift or a contrast change
    # (max_shift 0, and a flat image is blind to contrast), a flat grey image stays flat
    # unless noise hits it.
    flat = torch.zeros(400, 1, 8, 8)
    noisy = augment(flat, max_shift=0, generator=torch.Generator().manual_seed(3))
    share_noisy = float((noisy.flatten(1).std(1) > 1e-3).float().mean())
    assert 0.35 < share_noisy < 0.65
    bar = -torch.ones(400, 1, 8, 8)
    bar[:, :, :, 4] = 1.0
    smooth = augment(bar, max_shift=0, generator=torch.Generator().manual_seed(4))
    blurred = (smooth[:, :, 4, 3] > smooth[:, :, 4, 2] + 0.3).flatten()  # the bar bled left
    assert 0.35 < float(blurred.float().mean()) < 0.65


# ---- the variational bound ------------------------------------------------------------------
def _reference_bound(unet: torch.nn.Module, betas: torch.Tensor, x0: torch.Tensor,
                     draws: int, seed: int) -> torch.Tensor:
    """A direct transcription of the bound, image by image and t by t, with the draws of
    ``variational_bound`` (image i's generator, t first, then ε)."""
    schedule = _Schedule(betas)
    steps = len(betas)
    x0 = quantise(x0.double())
    results = []
    for i in range(len(x0)):
        generator = image_generator(seed, i)
        t_draws = stratified_timesteps(draws, steps, generator)
        noise = torch.randn((draws + 1, *x0.shape[1:]), generator=generator,
                            dtype=torch.float64)
        a_bar_T = schedule.alpha_bars[-1]
        prior = 0.5 * (a_bar_T * x0[i] ** 2 + (1 - a_bar_T) - 1 - math.log(1 - a_bar_T)).sum()
        terms = []
        for k in range(draws):
            t = int(t_draws[k])
            a_bar, beta, alpha = schedule.alpha_bars[t], schedule.betas[t], schedule.alphas[t]
            x_t = a_bar.sqrt() * x0[i] + (1 - a_bar).sqrt() * noise[k]
            eps = unet(x_t[None].float(), torch.tensor([t])).sample[0].double()
            sigma2 = beta * (1 - schedule.alpha_bars[t - 1]) / (1 - a_bar)
            terms.append(beta ** 2 / (2 * sigma2 * alpha * (1 - a_bar))
                         * (noise[k] - eps).square().sum())
        middle = torch.stack(terms).mean() * (steps - 1)
        a_bar, beta = schedule.alpha_bars[0], schedule.betas[0]
        x1 = a_bar.sqrt() * x0[i] + (1 - a_bar).sqrt() * noise[draws]
        eps = unet(x1[None].float(), torch.tensor([0])).sample[0].double()
        mean = (x1 - beta / (1 - a_bar).sqrt() * eps) / schedule.alphas[0].sqrt()
        variance = schedule.betas[1] * (1 - schedule.alpha_bars[0]) / (1 - schedule.alpha_bars[1])
        log_p = discretised_gaussian_log_likelihood(x0[i], mean,
                                                    0.5 * torch.log(variance).expand_as(mean))
        results.append((prior + middle - log_p.sum()) / (x0[i].numel() * math.log(2)))
    return torch.stack(results)


class _Schedule:
    """The schedule's quantities, computed here independently of the code under test."""

    def __init__(self, betas: torch.Tensor) -> None:
        self.betas = betas.double()
        self.alphas = 1 - self.betas
        self.alpha_bars = torch.cumprod(self.alphas, 0)
        previous = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bars[:-1]])
        posterior = self.betas * (1 - previous) / (1 - self.alpha_bars)
        self.posterior_variance = torch.cat([posterior[1:2], posterior[1:]])


def test_every_timestep_is_drawn_once_when_there_are_as_many_strata() -> None:
    draws = stratified_timesteps(49, 50, torch.Generator().manual_seed(0))
    assert draws.tolist() == list(range(1, 50))
    # Four draws of 1..999: one in each quarter [1, 250.75), [250.75, 500.5), ... (floored).
    few = stratified_timesteps(4, 1000, torch.Generator().manual_seed(0)).tolist()
    edges = [1, 250.75, 500.5, 750.25, 1000]
    assert all(int(lo) <= t <= int(hi) for t, lo, hi in zip(few, edges, edges[1:]))
    assert len(set(few)) == 4


@pytest.mark.parametrize("draws", [5, 49])  # 49: every t of the 50-step schedule once
def test_the_bound_equals_a_direct_transcription(draws: int) -> None:
    torch.manual_seed(0)
    unet = UNet2DModel(**TINY_UNET).eval()
    betas = torch.linspace(1e-4, 0.02, 50)
    images = load_digits(8).images[:3]
    result = variational_bound(unet, betas, images, timesteps=draws, seed=3, batch_size=13)
    with torch.no_grad():
        expected = _reference_bound(unet, betas, images, draws=draws, seed=3)
    torch.testing.assert_close(result.bits_per_dim, expected.double(), rtol=1e-4, atol=1e-4)


class _Oracle(torch.nn.Module):
    """The exact noise predictor for a data set of one image x0: ε = (x_t − √ᾱ x0)/√(1−ᾱ)."""

    def __init__(self, x0: torch.Tensor, betas: torch.Tensor) -> None:
        super().__init__()
        self.x0 = quantise(x0)
        self.alpha_bars = torch.cumprod(1 - betas.double(), 0)
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, class_labels: object = None):
        a_bar = self.alpha_bars[t].view(-1, 1, 1, 1).float()
        sample = (x_t - a_bar.sqrt() * self.x0) / (1 - a_bar).sqrt()
        return type("Output", (), {"sample": sample})


def test_the_bound_is_tight_for_the_exact_predictor_and_loose_for_a_wrong_one() -> None:
    x0 = load_digits(8).images[:1]
    oracle = variational_bound(_Oracle(x0, BETAS), BETAS, x0, timesteps=16)
    assert oracle.denoising_error.item() < 1e-6
    # Only the decoder is left (L_T is ~1e-5 nats): the mean is x_0 itself, so each pixel's
    # probability is the mass of its bin (edge bins: the half line) under N(0, β̃_1).
    schedule = _Schedule(BETAS)
    z = (1 / 255) / schedule.posterior_variance[0].sqrt()
    normal = torch.distributions.Normal(0.0, 1.0)
    interior, edge = normal.cdf(z) - normal.cdf(-z), normal.cdf(z)
    pixels = quantise(x0.double())
    at_edge = (pixels.abs() > 0.999).double()
    bits = -(at_edge * torch.log2(edge) + (1 - at_edge) * torch.log2(interior)).mean()
    assert oracle.bits_per_dim.item() == pytest.approx(float(bits), abs=1e-3)

    class Zero(_Oracle):
        def forward(self, x_t, t, class_labels=None):
            return type("Output", (), {"sample": torch.zeros_like(x_t)})

    wrong = variational_bound(Zero(x0, BETAS), BETAS, x0, timesteps=16)
    assert wrong.bits_per_dim.item() > 10 * oracle.bits_per_dim.item()
    assert wrong.denoising_error.item() == pytest.approx(1.0, abs=0.1)


def test_the_same_seed_gives_the_same_draws_for_every_model() -> None:
    torch.manual_seed(0)
    unet = UNet2DModel(**TINY_UNET).eval()
    images = load_digits(8).images[:6]
    first = variational_bound(unet, BETAS, images, timesteps=4, seed=1, batch_size=5)
    again = variational_bound(unet, BETAS, images, timesteps=4, seed=1, batch_size=24)
    other = variational_bound(unet, BETAS, images, timesteps=4, seed=2)
    torch.testing.assert_close(first.bits_per_dim, again.bits_per_dim)
    assert not torch.allclose(first.bits_per_dim, other.bits_per_dim)
    assert unet.training is False


# ---- the paired comparison ------------------------------------------------------------------
def test_intensity_drift_and_sample_change() -> None:
    images = -torch.ones(4, 1, 10, 10)
    images[:, :, 4:6, 4:6] = 1.0
    mean, background = intensity(images)
    assert background == -1.0 and mean == pytest.approx(-1 + 2 * 4 / 100)
    assert intensity(images + 0.1)[1] == pytest.approx(-0.9)
    changed = images.clone()
    changed[0] = 1.0
    result = sample_change(images, changed, torch.tensor([True, False, False, False]))
    assert result["forgotten"] == pytest.approx(2 * 96 / 100) and result["retained"] == 0.0
    assert result["ratio"] is None and result["forgotten_seeds"] == 1
    assert retained_drift(torch.tensor([5, 5, 0]), torch.tensor([0, 0, 5]), [0]) == 1.0
    assert retained_drift(torch.tensor([5, 5, 0]), torch.tensor([0, 5, 5]), [0]) == 0.5
    assert retained_drift(torch.tensor([5, 5, 5]), torch.tensor([0, 10, 10]), [0]) == 0.0


def _permuted(net: ClassifierNet, order: list[int]) -> ClassifierNet:
    """The same network with its classes renamed: it reads every image as another class."""
    other = ClassifierNet(**net.config).eval()
    other.load_state_dict(net.state_dict())
    with torch.no_grad():
        other.head[1].weight.copy_(net.head[1].weight[order])
        other.head[1].bias.copy_(net.head[1].bias[order])
    return other


def _trained_net(steps: int = 60) -> ClassifierNet:
    """A small evaluator trained briefly on the 8×8 digits (read at 16×16): it tells the
    classes apart well enough to give varied labels."""
    torch.manual_seed(0)
    data = load_digits(16)
    net = ClassifierNet(width=8)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for step in range(steps):
        index = torch.randint(0, len(data.images), (64,))
        loss = torch.nn.functional.cross_entropy(net(data.images[index]), data.labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net.eval()


def test_two_evaluators_are_compared_and_a_disagreement_is_flagged() -> None:
    net = _trained_net()
    original = _digits(200)
    forget = int(net.predict(original)[0].bincount().argmax())
    unlearned = original.flip(0)
    agree = PairedEvaluation({"a": net, "b": net}, [forget], _digits(300)[200:])
    result = agree.compare(original, unlearned)
    assert result["pul_disagreement"] == 0 and not result["evaluators_disagree"]
    # b reads class c where a reads c + 1: with both c and c − 1 forgotten, both evaluators
    # count forgotten samples in the original, and their PULs differ.
    order = [(c + 1) % 10 for c in range(10)]
    classes = [forget, (forget - 1) % 10]
    for threshold in (0.0, 100.0):
        disagree = PairedEvaluation({"a": net, "b": _permuted(net, order)}, classes,
                                    _digits(300)[200:], disagreement=threshold)
        result = disagree.compare(original, _digits(400)[200:400])
        gap = abs(result["evaluators"]["a"]["pul"] - result["evaluators"]["b"]["pul"])
        assert gap > 0 and result["pul_disagreement"] == pytest.approx(gap)
        assert result["evaluators_disagree"] == (threshold == 0.0)
    assert result["evaluators"]["a"]["u_fid_name"] == "u_fid/classifier/ddim50"


def test_an_undefined_pul_leaves_the_agreement_undefined() -> None:
    net = _trained_net()
    digits = _digits(300)
    original = digits[net.predict(digits)[0] != 3][:150]  # no original sample a reads as 3
    other = _permuted(net, [(c + 1) % 10 for c in range(10)])  # b reads 3 where a reads 4
    result = PairedEvaluation({"a": net, "b": other}, [3], _digits(400)[300:]).compare(
        original, original.flip(0))
    assert math.isfinite(result["evaluators"]["b"]["pul"])
    assert math.isnan(result["evaluators"]["a"]["pul"])
    assert result["pul_disagreement"] is None and result["evaluators_disagree"] is None


def test_the_likelihood_change_gives_a_ratio_only_above_the_noise() -> None:
    def bounds(values: list[float]) -> Likelihood:
        tensor = torch.tensor(values, dtype=torch.float64)
        return Likelihood(bits_per_dim=tensor, denoising_error=tensor / 10)

    before = {"forget": bounds([1.0, 1.0, 1.0]), "retain": bounds([1.0, 1.0, 1.0, 1.0])}
    clear = {"forget": bounds([3.0, 3.2, 2.8]), "retain": bounds([1.5, 1.45, 1.55, 1.5])}
    result = likelihood_change(before, clear)
    assert result["forget"]["bits_per_dim_increase"] == pytest.approx(2.0)
    assert result["retain"]["bits_per_dim_increase"] == pytest.approx(0.5)
    assert result["forget_minus_retain"] == pytest.approx(1.5)
    assert result["selectivity"] == pytest.approx(4.0)
    assert result["retain"]["denoising_error_increase"] == pytest.approx(0.05)
    noisy = {"forget": bounds([3.0, 3.2, 2.8]), "retain": bounds([1.5, 0.4, 1.6, 0.6])}
    result = likelihood_change(before, noisy)
    assert result["selectivity"] is None and result["forget_minus_retain"] == pytest.approx(
        2.0 - 0.025)


def test_the_controls_build_what_they_promise() -> None:
    samples = _digits(20)
    torch.testing.assert_close(haze_control(samples, 0.05)[samples < 0.9],
                               samples[samples < 0.9] + 0.05)
    labels = torch.arange(20) % 4
    retained = -samples[:10]
    replaced = perfect_forgetter_control(samples, labels, [1, 3], retained, seed=0)
    kept = ~torch.isin(labels, torch.tensor([1, 3]))
    torch.testing.assert_close(replaced[kept], samples[kept])
    for image in replaced[~kept]:
        assert any(torch.equal(image, r) for r in retained)
    with pytest.raises(ValueError, match="10 samples to replace but only 3"):
        perfect_forgetter_control(samples, labels, [1, 3], retained[:3])


# ---- the grid -------------------------------------------------------------------------------
def test_the_grid_is_upscaled_captioned_and_frames_the_forgotten_seeds() -> None:
    import numpy as np

    generator = torch.Generator().manual_seed(0)
    original = torch.rand(4, 1, 16, 16, generator=generator) * 2 - 1
    unlearned = -original
    reading = (torch.tensor([1, 0, 1, 2]), torch.tensor([0.9, 0.8, 0.7, 0.6]))
    tile, frame = 64, max(2, 64 // 24)
    picture = np.array(before_after_grid(original, unlearned, reading, reading, [1],
                                         tile=tile, columns=2))
    red = (picture[..., 0] > 200) & (picture[..., 1] < 60) & (picture[..., 2] < 60)
    # Seeds 0 and 2 (left column) are framed in both panels: two columns of frames of
    # 64 + 2·frame pixels, one per panel, spanning two rows of tiles.
    columns = np.nonzero(red.any(0))[0]
    assert len(columns) == 2 * (tile + 2 * frame)
    assert red.any(1).sum() == 2 * (tile + 2 * frame)
    # Each tile is its sample enlarged 4× without smoothing, inside the frame: find the first
    # framed tile of each panel and compare it with np.repeat of the sample.
    panels = np.split(columns, np.nonzero(np.diff(columns) > 1)[0] + 1)
    top = np.nonzero(red.any(1))[0][0]
    for panel, images in zip(panels, (original, unlearned)):
        x, y = panel[0] + frame, top + frame
        expected = ((images[0, 0] + 1) * 127.5).round().byte().numpy()
        expected = np.repeat(np.repeat(expected, 4, 0), 4, 1)
        np.testing.assert_array_equal(picture[y:y + tile, x:x + tile, 0], expected)
    # Captions under the tiles: dark text pixels below the first framed tile.
    below = picture[top + tile + 2 * frame + 1: top + tile + 2 * frame + 14,
                    panels[0][0]: panels[0][0] + tile]
    assert (below.mean(2) < 100).sum() > 10


# ---- the cache ------------------------------------------------------------------------------
def test_the_cache_round_trips_and_survives_a_damaged_entry(tmp_path: Path) -> None:
    cache = OriginalCache(tmp_path)
    key = cache.key(model="ab", num_samples=3)
    assert key != cache.key(model="ab", num_samples=4) and cache.load(key) is None
    entry = {"samples": torch.rand(3, 1, 4, 4), "likelihood": {}}
    cache.store(key, entry)
    torch.testing.assert_close(cache.load(key)["samples"], entry["samples"])
    cache.path(key).write_bytes(b"truncated")
    assert cache.load(key) is None


def test_the_weights_digest_sees_any_change() -> None:
    net = ClassifierNet(width=8)
    before = state_digest(net)
    assert state_digest(net) == before
    with torch.no_grad():
        net.head[1].bias[0] += 1e-7
    assert state_digest(net) != before


def test_the_metrics_and_the_evaluation_import_no_lightning() -> None:
    """``vdu_lightning.metrics`` and ``vdu_lightning.evaluation`` are plain torch: they take
    ``nn.Module``s, and import neither Lightning nor the project's LightningModules."""
    banned = ("lightning", "pytorch_lightning", "vdu_lightning.modules",
              "vdu_lightning.callbacks", "vdu_lightning.data", "vdu_lightning.cli")
    for package in ("metrics", "evaluation"):
        files = sorted((REPO / "vdu_lightning" / package).glob("*.py"))
        assert files
        for path in files:
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [node.module or ""]
                else:
                    continue
                for name in names:
                    assert not name.startswith(banned), f"{path.name} imports {name}"
