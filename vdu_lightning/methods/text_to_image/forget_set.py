"""``vdu generate-forget-set``: a forget set made by the text-to-image model itself.

When the images to forget are gone (or never existed as a data set), the model's own samples
for a prompt stand in for them. The folder written is the layout ``CaptionedImageFolder``
reads: ``000000.png``, ``000001.png``, ... and a ``metadata.jsonl`` whose rows give each
image's caption (the prompt), its seed and the settings that made it.

Image ``i`` starts from the noise of its own generator, seeded ``seed + i``, and is made in the
batch ``[i - i % batch_size, ...)`` of full size whatever ``num_images`` is: batched kernels
round differently for another batch shape, so fixed batches are what make a resumed or grown
set byte-identical to one made in a single run (with the same batch size and hardware).

A run may be killed at any moment: every image and the metadata are written atomically, the
metadata after each batch, and a rerun skips the images the metadata lists and that are
present. A rerun whose settings differ from the folder's is refused: nothing is overwritten.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm

from vdu_lightning.data.folder import METADATA_FILE, json_lines
from vdu_lightning.files import atomic_file, atomic_write_text, check_directory_writable
from vdu_lightning.methods.text_to_image.pipelines import check_pipeline_dir, load_pipeline

#: The file name of image ``i``; six digits sort correctly up to a million images.
_FILE_NAME = re.compile(r"^(\d{6,})\.png$")
#: Row keys that record how the images were made, and the option that sets each.
_SETTINGS = {"text": "--prompt", "seed": "--seed", "num_inference_steps": "--num-inference-steps",
             "guidance_scale": "--guidance-scale", "negative_prompt": "--negative-prompt",
             "height": "--height", "width": "--width"}


class ForgetSetRun(NamedTuple):
    """What one call of ``generate_forget_set`` did."""

    written: int  #: images made by this call
    already_there: int  #: images the folder held before (kept)
    beyond_n: int  #: of those, how many lie beyond ``num_images`` (kept too)


def file_name(index: int) -> str:
    """The file name of image ``index`` in a generated forget set."""
    return f"{index:06d}.png"


def _default_size(pipeline_dir: Path) -> tuple[int, int]:
    """(height, width) the pipeline makes by default, read from its configs (no weights)."""
    unet = json.loads((pipeline_dir / "unet" / "config.json").read_text())
    vae = json.loads((pipeline_dir / "vae" / "config.json").read_text())
    # As diffusers computes it: the UNet's latent size times the VAE's down-sampling.
    scale = 2 ** (len(vae.get("block_out_channels", [0])) - 1)
    size = unet["sample_size"]
    height, width = (size, size) if isinstance(size, int) else size
    return height * scale, width * scale


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device: {device!r} is not a device (expected auto, cpu, cuda, "
                         "cuda:1, ...)") from err
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} asked for, but no CUDA device is available")
    return chosen


def _read_rows(out: Path) -> list[dict[str, Any]]:
    path = out / METADATA_FILE
    rows = []
    for number, row in json_lines(path):
        if not isinstance(row, dict) or not _FILE_NAME.match(str(row.get("file_name"))):
            raise ValueError(f"{path}, line {number}: not a row written by vdu "
                             "generate-forget-set (file_name must be like 000000.png); use "
                             "another --out")
        rows.append(row)
    return rows


def _check_same_settings(out: Path, rows: list[dict[str, Any]], expected: dict[str, Any]) -> None:
    """Raise unless every row was made with the settings of this run (seed: seed + index)."""
    for row in rows:
        index = int(_FILE_NAME.match(row["file_name"])[1])
        for key, option in _SETTINGS.items():
            want = expected[key] + index if key == "seed" else expected[key]
            if row.get(key) == want:
                continue
            was = row.get(key)
            if key == "seed" and isinstance(was, int):
                was, want = was - index, expected[key]  # in terms of --seed, as the user gave it
            raise ValueError(
                f"{out} holds a forget set made with {option} {was!r}, and this run asks for "
                f"{want!r} ({row['file_name']} in {METADATA_FILE}): use another --out for "
                "another forget set, or the same settings to resume this one; nothing was changed"
            )


def _write_rows(out: Path, rows: dict[int, dict[str, Any]]) -> None:
    # ASCII JSON: the file reads the same whatever the locale's encoding.
    text = "".join(json.dumps(rows[index]) + "\n" for index in sorted(rows))
    atomic_write_text(out / METADATA_FILE, text)


def generate_forget_set(
    pipeline_dir: str | Path,
    prompt: str,
    num_images: int,
    out_dir: str | Path,
    seed: int = 0,
    num_inference_steps: int = 30,
    guidance_scale: float = 7.5,
    batch_size: int = 4,
    height: int | None = None,
    width: int | None = None,
    device: str = "auto",
    negative_prompt: str | None = None,
) -> ForgetSetRun:
    """Write ``num_images`` samples of ``prompt`` from an SD pipeline as a forget set.

    Resumable: images already in ``out_dir`` (listed in its ``metadata.jsonl`` and present)
    are kept, and the missing ones are made; the result is the same as one uninterrupted run.
    Nothing is ever deleted, also when the folder holds more than ``num_images``.

    Args:
        pipeline_dir: a Stable Diffusion pipeline directory (``save_pretrained`` layout).
        prompt: the text of every image, and its caption in ``metadata.jsonl``.
        num_images: how many images the folder should hold (>= 1).
        out_dir: the folder; created if missing.
        seed: image ``i`` is drawn with a generator seeded ``seed + i``.
        num_inference_steps, guidance_scale, height, width, negative_prompt: as in
            ``StableDiffusionPipeline.__call__`` (height/width default to the model's size).
        batch_size: images per call of the pipeline.
        device: ``auto`` (CUDA when there is one), ``cpu``, ``cuda``, ...

    Raises:
        FileNotFoundError: ``pipeline_dir`` is not a pipeline directory.
        NotADirectoryError, PermissionError: ``out_dir`` cannot be written.
        ValueError: a bad argument, or ``out_dir`` holds something else than a forget set
            made with these settings.

    Example:
        >>> generate_forget_set("sd-model", "a painting by X", 64, "forget_x")  # doctest: +SKIP
        ForgetSetRun(written=64, already_there=0, beyond_n=0)
    """
    # Every check runs before the model is loaded (seconds to minutes for a real one, and a
    # download for a Hub ID: the arguments are checked before that).
    out = Path(out_dir)
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt must be a non-empty text, got {prompt!r}")
    for name, value in (("num_images", num_images), ("num_inference_steps", num_inference_steps),
                        ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    pipeline_dir = check_pipeline_dir(pipeline_dir)
    default_height, default_width = _default_size(pipeline_dir)
    height = default_height if height is None else height
    width = default_width if width is None else width
    if height % 8 or width % 8 or height < 8 or width < 8:
        raise ValueError(f"height and width must be positive multiples of 8 (as diffusers asks), "
                         f"got {height} x {width}")
    torch_device = _device(device)
    check_directory_writable(out, "forget set folder")
    expected = {"text": prompt, "seed": seed, "num_inference_steps": num_inference_steps,
                "guidance_scale": float(guidance_scale), "negative_prompt": negative_prompt,
                "height": height, "width": width}
    old_rows: list[dict[str, Any]] = []
    if (out / METADATA_FILE).is_file():
        old_rows = _read_rows(out)
        _check_same_settings(out, old_rows, expected)
    elif out.is_dir() and any(not path.name.startswith(".") for path in out.iterdir()):
        # Without metadata the files could be anyone's: ours would overwrite 000000.png etc.
        # (Hidden files are never ours to overwrite: a temporary left by a kill, .DS_Store.)
        raise ValueError(f"{out} is not empty and has no {METADATA_FILE}: it is not a forget set "
                         "made by vdu generate-forget-set; use a new or empty --out")

    # A row whose image is gone (deleted, or never written) is dropped and the image made again.
    rows = {int(_FILE_NAME.match(row["file_name"])[1]): row for row in old_rows
            if (out / row["file_name"]).is_file()}
    beyond = sum(index >= num_images for index in rows)
    missing = [index for index in range(num_images) if index not in rows]
    done = ForgetSetRun(len(missing), len(rows), beyond)
    if not missing:
        if len(rows) != len(old_rows):
            _write_rows(out, rows)
        return done

    pipeline = load_pipeline(pipeline_dir).to(torch_device)
    pipeline.set_progress_bar_config(disable=True)  # one bar over images, not one per batch
    # Written before the first image: files without it could not be told from someone else's.
    _write_rows(out, rows)
    to_write = set(missing)
    starts = sorted({index - index % batch_size for index in missing})
    with tqdm(total=num_images, initial=num_images - len(missing), unit="image",
              desc="generating") as bar:
        for start in starts:
            batch = range(start, start + batch_size)
            # CPU generators: the same noise on every device.
            generators = [torch.Generator("cpu").manual_seed(seed + index) for index in batch]
            images = pipeline(
                [prompt] * batch_size, height=height, width=width,
                num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                negative_prompt=None if negative_prompt is None else [negative_prompt] * batch_size,
                generator=generators, output_type="pil",
            ).images
            for index, image in zip(batch, images):
                if index not in to_write:
                    continue  # already there, or beyond num_images (made only to fill the batch)
                with atomic_file(out / file_name(index)) as tmp:
                    image.save(tmp, format="PNG")
                rows[index] = {"file_name": file_name(index), **expected, "seed": seed + index}
                bar.update(1)
            _write_rows(out, rows)
    return done


def generate_forget_set_command(args: Sequence[str]) -> None:
    """``vdu generate-forget-set``: parse the options, make the set, print a summary."""
    parser = argparse.ArgumentParser(
        prog="vdu generate-forget-set",
        description="Make a forget set with the model itself: N samples of a prompt from a "
                    "local Stable Diffusion pipeline directory, written as PNG files with a "
                    "metadata.jsonl (caption, seed and settings of each image). Resumable: "
                    "rerun the same command to finish a killed run or to add images.")
    parser.add_argument("--pipeline", required=True,
                        help="the pipeline directory, or a Hub ID (owner/name[@revision])")
    parser.add_argument("--prompt", required=True, help="what to generate (each image's caption)")
    parser.add_argument("-n", "--num-images", type=int, required=True,
                        help="how many images the folder should hold")
    parser.add_argument("--out", required=True, help="the forget set folder")
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    parser.add_argument("--num-inference-steps", type=int, default=30)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--height", type=int, default=None, help="default: the model's size")
    parser.add_argument("--width", type=int, default=None, help="default: the model's size")
    parser.add_argument("--batch-size", type=int, default=4, help="images per pipeline call")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    options = parser.parse_args(args)
    try:
        run = generate_forget_set(
            options.pipeline, options.prompt, options.num_images, options.out, options.seed,
            options.num_inference_steps, options.guidance_scale, options.batch_size,
            options.height, options.width, options.device, options.negative_prompt)
    except (FileNotFoundError, NotADirectoryError, PermissionError, ValueError) as err:
        parser.exit(2, f"vdu generate-forget-set: error: {err}\n")
    if run.beyond_n:
        print(f"{options.out} holds {run.already_there} images, more than -n "
              f"{options.num_images}: nothing deleted")
    print(f"wrote {run.written} images to {options.out} ({run.already_there} already there)")
