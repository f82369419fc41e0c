"""TextToImageEvaluation on a tiny real SD pipeline, CLIP model and classifier (built in code):
its numbers against hand computations on the very same images, its files, W&B, refusals, CLI."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import wandb
from diffusers import StableDiffusionPipeline
from lightning.pytorch.loggers import WandbLogger
from PIL import Image
from torchmetrics.multimodal import CLIPScore
from transformers import CLIPModel, CLIPProcessor

from conftest import CONFIGS
from detectors import ChannelMean
from evaluation_helpers import one_thread, perturb, tiny_classifier
from tiny_clip import PooledCLIP, save_tiny_clip
from tiny_sd import IMAGE_SIZE, captioned_folder, save_tiny_sd
from vdu_lightning import ClassifierModule, ForgetSetDataModule
from vdu_lightning.callbacks import TextToImageEvaluation
from vdu_lightning.cli import VDUCLI
from vdu_lightning.data.folder import CaptionedImageFolder
from vdu_lightning.metrics import UnlearnedFID, percent_unlearned
from vdu_lightning.methods.text_to_image.module import TextToImageVDUModule

PROMPTS = ["a red barn", "a red car"]
RETAIN = ["a blue sea"]
SEEDS = 3
#: One pipeline call makes all nine images, as in the hand computation: batched kernels round
#: differently for other batch compositions.
SETTINGS = {"prompts": PROMPTS, "retain_prompts": RETAIN, "images_per_prompt": SEEDS,
            "num_inference_steps": 2, "guidance_scale": 3.0, "batch_size": 16, "grid_seeds": 2,
            "detector": "detectors.ChannelMean", "detector_args": {"channel": 0}}
FID_NAME = "u_fid/classifier/pndm2"  # the tiny pipeline's sampler is PNDM


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


def save_classifier(path: Path) -> Path:
    """A random RGB classifier whose features spread (FID features for u-FID)."""
    tiny_classifier(path, in_channels=3, num_classes=2, width=4)
    return path


class CountingModule(TextToImageVDUModule):
    """The real module, counting how often the original pipeline is built."""

    originals_built = 0

    def pipeline(self, original: bool = False) -> StableDiffusionPipeline:
        type(self).originals_built += original
        return super().pipeline(original)


def unlearned_module(sd_dir: Path) -> CountingModule:
    """The tiny pipeline with a moved UNet standing in for an unlearned one."""
    module = CountingModule(str(sd_dir))
    perturb(module.unet, seed=3)
    return module


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    with one_thread():
        return _world(tmp_path_factory.mktemp("t2i_eval"))


def _world(root: Path) -> dict:
    """The models on disk, and every number computed by hand from images made by hand."""
    paths = {"sd": save_tiny_sd(root / "sd"), "clip": save_tiny_clip(root / "clip"),
             "classifier": save_classifier(root / "classifier"),
             "reference": captioned_folder(root / "reference", 6, seed=1)}
    module = unlearned_module(paths["sd"])
    prompts = [p for p in PROMPTS + RETAIN for _ in range(SEEDS)]
    images = {}
    for name in ("original", "unlearned"):
        pipeline = module.pipeline(original=name == "original")
        generators = [torch.Generator().manual_seed(s) for _ in PROMPTS + RETAIN
                      for s in range(SEEDS)]
        images[name] = pipeline(prompts, num_inference_steps=2, guidance_scale=3.0,
                                generator=generators, output_type="pt").images
    forget = len(PROMPTS) * SEEDS
    scores = {name: ChannelMean(0)(x[:forget]).double() for name, x in images.items()}
    # A threshold in the widest gap between scores that leaves n_orig > 0 and n_orig != n_unl,
    # so that PUL is a number other than 0 and floating-point rounding cannot move a count.
    every = torch.sort(torch.cat(list(scores.values()))).values
    candidates = [((every[i + 1] - every[i]).item(), ((every[i] + every[i + 1]) / 2).item())
                  for i in range(len(every) - 1)]
    counts = {t: [int((s > t).sum()) for s in scores.values()] for _, t in candidates}
    _, threshold = max(c for c in candidates if counts[c[1]][0] > 0
                       and counts[c[1]][0] != counts[c[1]][1])

    model = CLIPModel.from_pretrained(paths["clip"], local_files_only=True)
    processor = CLIPProcessor.from_pretrained(paths["clip"], local_files_only=True)
    clips = {}
    for name, x in images.items():
        pixels = (x * 255).round().to(torch.uint8)  # torchmetrics takes [0, 255] images
        for part, where in (("forget", slice(0, forget)), ("retain", slice(forget, None))):
            metric = CLIPScore(lambda: (PooledCLIP(model), processor))
            metric.update(list(pixels[where]), prompts[where])
            # The mean is clipped at 0; the sum of the per-image scores is not.
            clips[f"clip_score/{part}/{name}"] = (metric.compute().item(), metric.score.item())

    fid = UnlearnedFID(classifier=ClassifierModule.from_pretrained(paths["classifier"]),
                       sampler="pndm", num_steps=2)
    reference = CaptionedImageFolder(paths["reference"], image_size=IMAGE_SIZE)
    fid.update(torch.stack([reference[i]["image"] for i in range(len(reference))]), real=True)
    fids = {}
    for name, x in images.items():
        fid.update(x[forget:] * 2 - 1, real=False)  # u-FID: the retain prompts' images
        fids[name] = fid.compute().item()
        fid.reset()
    return {**paths, "images": images, "scores": scores, "threshold": threshold,
            "clip_scores": clips, "fid": fids}


def _callback(world: dict, **overrides: object) -> TextToImageEvaluation:
    kwargs = {**SETTINGS, "threshold": world["threshold"], "clip_model": str(world["clip"]),
              "reference_folder": str(world["reference"]),
              "fid_classifier": str(world["classifier"]), **overrides}
    return TextToImageEvaluation(**kwargs)


def _validate(module: TextToImageVDUModule, callback: TextToImageEvaluation, world: dict,
              logger: object = False) -> None:
    data = ForgetSetDataModule(dataset="folder", root=str(world["reference"]),
                               forget_folder=str(world["reference"]), image_size=IMAGE_SIZE,
                               batch_size=2, eval_size=2)
    trainer = pl.Trainer(accelerator="cpu", logger=logger, limit_val_batches=1,
                         callbacks=[callback], enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    trainer.validate(module, datamodule=data)


def _halves(png: Path) -> tuple[np.ndarray, np.ndarray]:
    pixels = np.asarray(Image.open(png).convert("RGB"), dtype=float)
    width = (pixels.shape[1] - 8) // 2
    return pixels[:, :width], pixels[:, -width:]


def test_validate_matches_hand_computations_on_the_same_images_and_logs_to_wandb(
        tmp_path: Path, world: dict) -> None:
    CountingModule.originals_built = 0
    module, callback = unlearned_module(world["sd"]), _callback(world)
    _validate(module, callback, world, WandbLogger(save_dir=str(tmp_path / "logs"),
                                                   offline=True))
    wandb.finish()

    written = list((tmp_path / "logs" / "evaluation").glob("*/evaluation_step_0000000.json"))
    assert len(written) == 1, written  # one folder per W&B run
    results = json.loads(written[0].read_text())
    metrics = results["metrics"]
    # The detector saw the very images made by hand: the same scores, the same counts.
    for name in ("original", "unlearned"):
        np.testing.assert_allclose(results["detector_scores"][name],
                                   world["scores"][name].view(len(PROMPTS), SEEDS), atol=1e-5)
    n_orig, n_unl = (int((world["scores"][name] > world["threshold"]).sum())
                     for name in ("original", "unlearned"))
    assert (metrics["n_original"], metrics["n_unlearned"]) == (n_orig, n_unl)
    assert metrics["pul"] == pytest.approx(percent_unlearned(n_orig, n_unl).item())
    assert metrics["pul"] == pytest.approx(100 * (n_orig - n_unl) / n_orig)
    for key, (mean, total) in world["clip_scores"].items():
        _, part, name = key.split("/")
        rows = slice(0, len(PROMPTS)) if part == "forget" else slice(len(PROMPTS), None)
        assert metrics[key] == pytest.approx(mean, abs=1e-4), key
        assert sum(sum(results["clip_scores"][name][rows], [])) == pytest.approx(total, abs=1e-4)
    assert results["clip_scores"]["original"] != results["clip_scores"]["unlearned"]
    assert (results["fid_name"], results["features"], results["sampler"]) == (
        FID_NAME, "classifier", "pndm")
    assert np.isfinite(metrics[FID_NAME]) and np.isfinite(metrics[f"original/{FID_NAME}"])
    assert metrics[FID_NAME] == pytest.approx(world["fid"]["unlearned"], rel=1e-4)
    assert metrics[f"original/{FID_NAME}"] == pytest.approx(world["fid"]["original"], rel=1e-4)
    assert results["num_reference"] == 6 and results["stage"] == "validate"
    logged = module.trainer.callback_metrics
    assert float(logged["eval/pul"]) == pytest.approx(metrics["pul"])
    assert float(logged[f"eval/{FID_NAME}"]) == pytest.approx(metrics[FID_NAME])

    # The grid: a row per prompt (all three), a column per grid seed (2), original | unlearned.
    png = written[0].parent / "samples_step_0000000.png"
    tile = IMAGE_SIZE + 2
    half = (3 * tile + 2, 2 * tile + 2)
    left, right = _halves(png)
    assert np.asarray(Image.open(png)).shape[:2] == (half[0], 2 * half[1] + 8)
    for row in range(3):
        for seed in range(2):
            k = row * SEEDS + seed
            top, side = 2 + row * tile, 2 + seed * tile
            for got, name in ((left, "original"), (right, "unlearned")):
                expected = world["images"][name][k].permute(1, 2, 0).numpy() * 255
                np.testing.assert_allclose(got[top:top + IMAGE_SIZE, side:side + IMAGE_SIZE],
                                           expected, atol=1)
    media = list((tmp_path / "logs" / "wandb").glob("offline-run-*/files/media/images/**/*.png"))
    assert len(media) == 1, media  # the grid went to W&B
    assert np.array_equal(np.asarray(Image.open(media[0]).convert("RGB")),
                          np.asarray(Image.open(png).convert("RGB")))

    # A second evaluation (the UNet moved again) builds no original pipeline: its scores and
    # grid half are the cached ones, while the unlearned side is made anew.
    first = results
    perturb(module.unet, seed=4)
    callback.dirpath = str(tmp_path / "second")
    _validate(module, callback, world)
    second = json.loads((tmp_path / "second" / "evaluation_step_0000000.json").read_text())
    assert CountingModule.originals_built == 1
    assert second["detector_scores"]["original"] == first["detector_scores"]["original"]
    assert second["detector_scores"]["unlearned"] != first["detector_scores"]["unlearned"]
    assert second["metrics"][f"original/{FID_NAME}"] == metrics[f"original/{FID_NAME}"]
    again_left, again_right = _halves(tmp_path / "second" / "samples_step_0000000.png")
    assert np.array_equal(again_left, left) and not np.array_equal(again_right, right)


@pytest.fixture(scope="module")
def module(world: dict) -> TextToImageVDUModule:
    return TextToImageVDUModule(str(world["sd"]))


def _empty(tmp_path: Path) -> str:
    (tmp_path / "empty").mkdir()
    return str(tmp_path / "empty")


@pytest.mark.parametrize(("overrides", "error", "message"), [
    ({"detector": "no_such_package.Detector"}, ImportError,
     r"detector 'no_such_package.Detector': cannot import 'no_such_package'"),
    ({"detector": "detectors.NoSuchDetector"}, ImportError,
     r"detector 'detectors.NoSuchDetector': 'detectors' has no 'NoSuchDetector'"),
    ({"detector": "detectors.NOT_A_DETECTOR", "detector_args": None}, TypeError,
     r"detector 'detectors.NOT_A_DETECTOR' is a float, not callable"),
    ({"detector": "detectors.mean_brightness"}, TypeError,
     r"detector_args \{'channel': 0\} given, but the detector 'detectors.mean_brightness' is "
     r"not a class"),
    ({"clip_model": "models/no_clip"}, FileNotFoundError,
     r"clip_model directory not found or not a CLIP model: models/no_clip"),
    ({"reference_folder": "data/no_reference"}, FileNotFoundError,
     r"reference_folder: image folder not found: data/no_reference"),
    ({"reference_folder": _empty}, FileNotFoundError, r"reference_folder: no images in .*empty"),
    ({"fid_classifier": "models/no_classifier"}, FileNotFoundError,
     r"fid_classifier directory not found: models/no_classifier"),
], ids=["no module", "no name", "not callable", "args for a function", "no clip", "no reference",
        "empty reference", "no classifier"])
def test_setup_refuses_what_cannot_work_naming_it(tmp_path: Path, world: dict,
                                                  module: TextToImageVDUModule, overrides: dict,
                                                  error: type, message: str) -> None:
    overrides = {k: v(tmp_path) if callable(v) else v for k, v in overrides.items()}
    trainer = pl.Trainer(accelerator="cpu", logger=False)
    with pytest.raises(error, match=message):
        _callback(world, **overrides).setup(trainer, module, "validate")


def test_setup_refuses_other_modules_and_sharded_weights(world: dict,
                                                         module: TextToImageVDUModule) -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    trainer = pl.Trainer(accelerator="cpu", logger=False)
    with pytest.raises(TypeError, match=r"needs a text-to-image module such as "
                                        r"TextToImageVDUModule.*ClassifierModule lacks them"):
        _callback(world).setup(trainer, ClassifierModule(in_channels=3), "validate")
    sharded = pl.Trainer(accelerator="cpu", devices=1, logger=False, strategy=ModelParallelStrategy(
        data_parallel_size=1, tensor_parallel_size=1))
    with pytest.raises(ValueError, match=r"TextToImageEvaluation does not run under "
                                         r"ModelParallelStrategy \(FSDP2\)"):
        _callback(world).setup(sharded, module, "validate")


def test_a_detector_without_one_score_per_image_is_named(
        world: dict, module: TextToImageVDUModule) -> None:
    # nn.Identity returns the images themselves, [B, 3, H, W]: no count can come from that.
    # The detector sees the 6 images of the forget prompts only.
    callback = _callback(world, detector="torch.nn.Identity", detector_args=None,
                         clip_model=None, reference_folder=None, fid_classifier=None)
    with pytest.raises(ValueError, match=r"the detector torch.nn.Identity returned shape "
                                         r"\(6, 3, 16, 16\) for 6 images; it must return one "
                                         r"score per image, \[B\]"):
        _validate(module, callback, world)


def test_the_shipped_config_validates_with_the_evaluation_added_on_the_command_line(
        tmp_path: Path, world: dict) -> None:
    # What configs/sd/feature_unlearning.yaml reads when validating, in tiny.
    save_tiny_sd(tmp_path / "models/stable-diffusion-v1-4")
    captioned_folder(tmp_path / "data/forget", 2, seed=0)
    captioned_folder(tmp_path / "data/reference", 4, seed=2)
    evaluation = {"class_path": "vdu_lightning.callbacks.TextToImageEvaluation", "init_args": {
        "prompts": PROMPTS, "images_per_prompt": 2, "num_inference_steps": 2,
        "detector": "detectors.mean_brightness", "clip_model": str(world["clip"]),
        "reference_folder": "data/reference", "fid_classifier": str(world["classifier"]),
        "dirpath": "evaluation"}}
    cli = VDUCLI(args=["validate", "--config", str(CONFIGS / "sd" / "feature_unlearning.yaml"),
                       "--trainer.accelerator=cpu", "--trainer.limit_val_batches=1",
                       "--data.init_args.image_size=16",
                       f"--trainer.callbacks+={json.dumps(evaluation)}"])
    results = json.loads((tmp_path / "evaluation" / "evaluation_step_0000000.json").read_text())
    # The pretrained model is both original and unlearned here: nothing is unlearned.
    assert results["metrics"]["pul"] in (0.0, None)
    assert results["detector_scores"]["original"] == results["detector_scores"]["unlearned"]
    assert results["fid_name"] == FID_NAME and np.isfinite(results["metrics"][FID_NAME])
    assert "eval/clip_score/forget/unlearned" in cli.trainer.callback_metrics
    assert (tmp_path / "evaluation" / "samples_step_0000000.png").is_file()
