"""``vdu generate-forget-set`` with a tiny real Stable Diffusion pipeline: what it writes, that
a grown, killed or repeated run ends with what one uninterrupted run writes, and that it
refuses bad input and another forget set's folder before any model is loaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from tiny_sd import IMAGE_SIZE, save_tiny_sd
from vdu_lightning.methods.text_to_image import forget_set
from vdu_lightning.cli import main
from vdu_lightning.data.folder import CaptionedImageFolder
from vdu_lightning.methods.text_to_image.pipelines import load_pipeline

PROMPT = "a red cat"
#: Two steps and batches of 3: image 3 falls in a second, partly used batch.
SETTINGS = ["--num-inference-steps", "2", "--batch-size", "3", "--seed", "10",
            "--device", "cpu"]


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_sd(tmp_path_factory.mktemp("tiny_sd") / "sd")


def generate(pipeline_dir: Path, out: Path | str, n: int, *extra: str) -> None:
    main(["generate-forget-set", "--pipeline", str(pipeline_dir), "--prompt", PROMPT,
          "-n", str(n), "--out", str(out), *SETTINGS, *extra])


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden temporaries too), by relative path."""
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference_dir(pipeline_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four images made in one uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "forget"
    generate(pipeline_dir, out, 4)
    return out


@pytest.fixture
def reference(reference_dir: Path) -> dict[str, bytes]:
    return snapshot(reference_dir)


def test_the_command_writes_the_images_and_their_seeds_in_a_folder_that_loads(
        pipeline_dir: Path, reference: dict[str, bytes], capsys) -> None:
    generate(pipeline_dir, "forget", 4)
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[-1] == "wrote 4 images to forget (0 already there)"
    assert "generating" in captured.err  # the progress bar over images
    assert snapshot(Path("forget")) == reference  # the same arguments give the same bytes
    assert sorted(reference) == ["000000.png", "000001.png", "000002.png", "000003.png",
                                 "metadata.jsonl"]
    rows = [json.loads(line) for line in reference["metadata.jsonl"].decode().splitlines()]
    assert rows == [{"file_name": f"00000{i}.png", "text": PROMPT, "seed": 10 + i,
                     "num_inference_steps": 2, "guidance_scale": 7.5, "negative_prompt": None,
                     "height": IMAGE_SIZE, "width": IMAGE_SIZE} for i in range(4)]
    folder = CaptionedImageFolder("forget", image_size=IMAGE_SIZE)
    assert len(folder) == 4 and folder.captions == [PROMPT] * 4
    images = torch.stack([folder[i]["image"] for i in range(4)])
    assert images.shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert not torch.equal(images[0], images[1])  # each image has its own noise


def test_an_image_is_made_again_from_its_metadata_row_alone(
        pipeline_dir: Path, reference: dict[str, bytes], tmp_path: Path) -> None:
    # Plain diffusers, one image at a time (not the set's batches of 3), from the recorded seed:
    # the same picture up to the rounding of batched kernels (one level of 255).
    row = json.loads(reference["metadata.jsonl"].decode().splitlines()[3])
    pipeline = load_pipeline(pipeline_dir)
    pipeline.set_progress_bar_config(disable=True)
    again = pipeline(row["text"], num_inference_steps=row["num_inference_steps"],
                     guidance_scale=row["guidance_scale"], height=row["height"],
                     width=row["width"], generator=torch.Generator().manual_seed(row["seed"]),
                     output_type="pil").images[0]
    (tmp_path / "written.png").write_bytes(reference[row["file_name"]])
    written = np.asarray(Image.open(tmp_path / "written.png"), dtype=np.int16)
    assert np.abs(written - np.asarray(again, dtype=np.int16)).max() <= 1


def test_growing_a_set_gives_what_one_run_gives(pipeline_dir: Path, reference: dict[str, bytes],
                                                monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    real_call = StableDiffusionPipeline.__call__
    batches = []

    def records_the_seeds(self, *args, **kwargs):
        batches.append([generator.initial_seed() for generator in kwargs["generator"]])
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", records_the_seeds)
    generate(pipeline_dir, "forget", 2)
    assert sorted(snapshot(Path("forget"))) == ["000000.png", "000001.png", "metadata.jsonl"]
    generate(pipeline_dir, "forget", 4)
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        "wrote 2 images to forget (2 already there)")
    assert snapshot(Path("forget")) == reference
    # Equal bytes here can be luck: another batch shape changes an image by float rounding
    # only (with 10 steps, 2 images in 16 had a pixel one level off). So every batch is a
    # whole one, [i - i % 3, ...), whatever -n and whatever is already there.
    assert batches == [[10, 11, 12], [10, 11, 12], [13, 14, 15]]


def test_a_killed_run_keeps_whole_batches_and_a_rerun_finishes_it(
        pipeline_dir: Path, reference: dict[str, bytes],
        monkeypatch: pytest.MonkeyPatch) -> None:
    real_call = StableDiffusionPipeline.__call__
    calls = []

    def dies_on_the_second_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", dies_on_the_second_batch)
    with pytest.raises(RuntimeError, match="killed"):
        generate(pipeline_dir, "forget", 4)
    first_batch = ["000000.png", "000001.png", "000002.png", "metadata.jsonl"]
    crashed = snapshot(Path("forget"))
    assert sorted(crashed) == first_batch  # no half-written file, no temporary left
    assert all(crashed[name] == reference[name] for name in first_batch[:3])
    assert crashed["metadata.jsonl"] == b"".join(reference["metadata.jsonl"].splitlines(True)[:3])
    assert len(CaptionedImageFolder("forget")) == 3  # the killed run's folder is usable

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", real_call)
    # A kill between writing an image and listing it leaves an unlisted file: made again.
    Path("forget/000003.png").write_bytes(b"half an image")
    generate(pipeline_dir, "forget", 4)
    assert snapshot(Path("forget")) == reference


def test_a_smaller_n_deletes_nothing_and_loads_no_model(
        pipeline_dir: Path, reference_dir: Path, reference: dict[str, bytes],
        monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    shutil.copytree(reference_dir, "forget")
    monkeypatch.setattr(forget_set, "load_pipeline", _must_not_load)
    generate(pipeline_dir, "forget", 2)
    assert capsys.readouterr().out.splitlines() == [
        "forget holds 4 images, more than -n 2: nothing deleted",
        "wrote 0 images to forget (4 already there)"]
    assert snapshot(Path("forget")) == reference


def _must_not_load(path: object) -> None:
    raise AssertionError("the model was loaded")


@pytest.mark.parametrize("option, value, message", [
    ("--prompt", "a blue dog", "made with --prompt 'a red cat', and this run asks for "
                               "'a blue dog'"),
    ("--seed", "0", "made with --seed 10, and this run asks for 0"),
    ("--guidance-scale", "3", "made with --guidance-scale 7.5, and this run asks for 3.0"),
])
def test_another_forget_set_folder_is_refused_and_left_as_it_is(
        option: str, value: str, message: str, pipeline_dir: Path, reference_dir: Path,
        reference: dict[str, bytes], monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    shutil.copytree(reference_dir, "forget")
    monkeypatch.setattr(forget_set, "load_pipeline", _must_not_load)
    with pytest.raises(SystemExit) as exit_info:
        # argparse keeps the last of a repeated option: the changed setting wins.
        generate(pipeline_dir, "forget", 6, option, value)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("vdu generate-forget-set: error: forget holds a forget set ")
    assert message in error and "nothing was changed" in error
    assert snapshot(Path("forget")) == reference


def _bad_input(case: str, pipeline_dir: Path) -> tuple[list[str], str]:
    """(arguments, a piece of the expected message) for each kind of bad input."""
    args = {"--pipeline": str(pipeline_dir), "--prompt": PROMPT, "-n": "2", "--out": "forget"}
    if case == "missing pipeline":
        args["--pipeline"], message = "no_such_model", "pipeline directory not found: no_such"
    elif case == "not a pipeline":
        shutil.copytree(pipeline_dir, "broken")
        shutil.rmtree("broken/unet")
        args["--pipeline"], message = "broken", "broken is not a Stable Diffusion pipeline"
    elif case == "n < 1":
        args["-n"], message = "0", "num_images must be an integer >= 1, got 0"
    elif case == "empty prompt":
        args["--prompt"], message = "  ", "prompt must be a non-empty text, got '  '"
    elif case == "out under a file":
        Path("a_file").write_text("x")
        args["--out"], message = "a_file/forget", "a_file is a file, not a directory"
    elif case == "someone else's folder":
        Path("forget").mkdir()
        Path("forget/photo.png").write_bytes(b"not ours")
        message = "forget is not empty and has no metadata.jsonl"
    else:  # height not a multiple of 8
        args["--height"], message = "12", "multiples of 8 (as diffusers asks), got 12 x 16"
    return [part for pair in args.items() for part in pair], message


@pytest.mark.parametrize("case", ["missing pipeline", "not a pipeline", "n < 1", "empty prompt",
                                  "out under a file", "someone else's folder", "bad height"])
def test_bad_input_is_named_before_the_model_is_loaded(
        case: str, pipeline_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys) -> None:
    args, message = _bad_input(case, pipeline_dir)
    before = snapshot(tmp_path)
    monkeypatch.setattr(forget_set, "load_pipeline", _must_not_load)
    with pytest.raises(SystemExit) as exit_info:
        main(["generate-forget-set", *args, "--num-inference-steps", "2"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("vdu generate-forget-set: error: ") and message in error
    assert snapshot(tmp_path) == before  # nothing written
