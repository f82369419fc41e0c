"""Image folders with captions from .txt files or metadata.jsonl."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from images import write_decompression_bomb
from vdu_lightning.data import CaptionedImageFolder, load_dataset


def save_image(path: Path, value: int, size: tuple[int, int] = (20, 12)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((size[1], size[0], 3), value, dtype=np.uint8)
    pixels[..., 1] = 0
    Image.fromarray(pixels).save(path)


def test_txt_captions_beside_each_image(tmp_path: Path) -> None:
    save_image(tmp_path / "a.png", 255)
    save_image(tmp_path / "sub" / "b.jpg", 0)
    (tmp_path / "a.png").with_suffix(".txt").write_text("a red square\n")
    ds = CaptionedImageFolder(tmp_path, image_size=8)
    assert len(ds) == 2
    item = ds[0]
    assert item["caption"] == "a red square" and item["label"] == -1
    assert item["image"].shape == (3, 8, 8)
    assert torch.allclose(item["image"][0], torch.ones(8, 8))  # red channel at 255
    assert torch.allclose(item["image"][1], -torch.ones(8, 8))  # green channel at 0
    assert ds[1]["caption"] == ""  # no .txt: empty caption
    assert ds.classes == [-1]


def test_metadata_jsonl_gives_captions_and_labels(tmp_path: Path) -> None:
    for i in range(4):
        save_image(tmp_path / f"img{i}.png", 50 * i)
    rows = [{"file_name": f"img{i}.png", "text": f"caption {i}", "label": i % 2} for i in range(4)]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = CaptionedImageFolder(tmp_path, image_size=4, channels=1)
    assert [ds[i]["caption"] for i in range(4)] == [f"caption {i}" for i in range(4)]
    assert ds.labels.tolist() == [0, 1, 0, 1]
    assert ds[0]["image"].shape == (1, 4, 4)
    sub = ds.subset([1, 3])
    assert sub.captions == ["caption 1", "caption 3"] and sub.classes == [1]


def test_default_size_is_the_first_images_shorter_side(tmp_path: Path) -> None:
    save_image(tmp_path / "wide.png", 128, size=(20, 12))
    assert CaptionedImageFolder(tmp_path)[0]["image"].shape == (3, 12, 12)


def test_folder_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        CaptionedImageFolder(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no images in"):
        CaptionedImageFolder(tmp_path)
    save_image(tmp_path / "a.png", 1)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "gone.png", "text": "x"}\n')
    with pytest.raises(FileNotFoundError, match="gone.png"):
        CaptionedImageFolder(tmp_path)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png"\n')
    with pytest.raises(ValueError, match="line 1: not valid JSON"):
        CaptionedImageFolder(tmp_path)


def test_corrupt_image_is_named_when_read(tmp_path: Path) -> None:
    save_image(tmp_path / "good.png", 1)
    (tmp_path / "zbad.png").write_bytes(b"\x89PNG not really")
    ds = CaptionedImageFolder(tmp_path, image_size=4)
    with pytest.raises(ValueError, match="zbad.png is not a readable image"):
        ds[1]


def test_folder_through_the_registry_splits_randomly(tmp_path: Path) -> None:
    for i in range(10):
        save_image(tmp_path / f"{i}.png", i)
    train = load_dataset("folder", root=tmp_path, image_size=4, split="train", val_fraction=0.2)
    val = load_dataset("folder", root=tmp_path, image_size=4, split="val", val_fraction=0.2)
    assert (len(train), len(val)) == (8, 2)
    assert not set(train.files) & set(val.files)


def test_metadata_paths_are_normalised_and_bad_labels_named(tmp_path: Path) -> None:
    save_image(tmp_path / "a.png", 9)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "./a.png", "text": "dot"}\n')
    assert CaptionedImageFolder(tmp_path, image_size=4).captions == ["dot"]
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "label": "cat"}\n')
    with pytest.raises(ValueError, match="label of 'a.png' must be an integer, got 'cat'"):
        CaptionedImageFolder(tmp_path)


def test_a_16_bit_grey_png_is_read_at_its_depth(tmp_path: Path) -> None:
    # A quarter and three quarters of the 16-bit range: -0.5 and 0.5 in [-1, 1]. Converted to
    # 8 bits by Pillow, both would clip to 255 (white, 1.0).
    pixels = np.full((8, 8), 0x4000, dtype=np.uint16)
    pixels[:, 4:] = 0xC000
    Image.fromarray(pixels).save(tmp_path / "deep.png")
    assert (tmp_path / "deep.png").read_bytes()[24] == 16  # IHDR bit depth: a real 16-bit PNG
    expected = torch.full((8, 8), 0x4000 / 65535 * 2 - 1)
    expected[:, 4:] = 0xC000 / 65535 * 2 - 1
    grey = CaptionedImageFolder(tmp_path, image_size=8, channels=1)[0]["image"]
    torch.testing.assert_close(grey, expected[None])
    # Resized and as RGB: the grey value in each channel, as for an 8-bit grey image.
    Image.fromarray(np.full((16, 16), 0xC000, dtype=np.uint16)).save(tmp_path / "deep.png")
    rgb = CaptionedImageFolder(tmp_path, image_size=4, channels=3)[0]["image"]
    torch.testing.assert_close(rgb, torch.full((3, 4, 4), 0xC000 / 65535 * 2 - 1))


@pytest.mark.parametrize("file_name", ["../outside.png", "sub/../../outside.png", "ABSOLUTE"])
def test_a_metadata_file_name_outside_the_folder_is_refused(tmp_path: Path,
                                                            file_name: str) -> None:
    save_image(tmp_path / "outside.png", 7)
    save_image(tmp_path / "forget" / "a.png", 9)
    file_name = str(tmp_path / "outside.png") if file_name == "ABSOLUTE" else file_name
    (tmp_path / "forget" / "metadata.jsonl").write_text(
        json.dumps({"file_name": file_name, "text": "x"}) + "\n")
    with pytest.raises(ValueError, match=rf"metadata\.jsonl, line 1: file_name "
                                         rf"'{re.escape(file_name)}' is outside \S*forget: file "
                                         r"names are paths relative to the folder, inside it"):
        CaptionedImageFolder(tmp_path / "forget")


def test_a_decompression_bomb_is_named_when_checked_and_when_read(tmp_path: Path) -> None:
    save_image(tmp_path / "a.png", 1)
    write_decompression_bomb(tmp_path / "bomb.png")
    message = (r"bomb\.png is refused as a possible decompression bomb \(Image size \(196000000 "
               r"pixels\) exceeds limit .*\)\. Make it smaller, or, if you trust it, raise "
               r"PIL\.Image\.MAX_IMAGE_PIXELS$")
    folder = CaptionedImageFolder(tmp_path, image_size=4)
    with pytest.raises(ValueError, match=message):
        folder.check_images()
    with pytest.raises(ValueError, match=message):
        folder[1]
    (tmp_path / "a.png").unlink()  # the bomb is now the first image, read for its size
    with pytest.raises(ValueError, match=message):
        CaptionedImageFolder(tmp_path)
