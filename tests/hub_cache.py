"""A Hugging Face Hub cache built in a test, in the layout huggingface_hub writes.

``models--<owner>--<name>/blobs/<sha256>`` holds each file's bytes once,
``snapshots/<commit>/<path>`` links to it, and ``refs/<revision>`` names the commit: what a
download leaves behind, so that loading by ID with ``HF_HUB_OFFLINE=1`` reads it as it would
a real cache.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def add_to_hub_cache(cache: Path, repo_id: str, source: Path, revision: str = "main",
                     repo_type: str = "model") -> Path:
    """Put the files under ``source`` into ``cache`` as the ``repo_type`` repository
    ``repo_id`` at ``revision``; return the snapshot folder."""
    repo = cache / (f"{repo_type}s--" + repo_id.replace("/", "--"))
    files = sorted(p for p in source.rglob("*") if p.is_file())
    commit = hashlib.sha1(b"".join(p.read_bytes() for p in files)).hexdigest()
    snapshot = repo / "snapshots" / commit
    for file in files:
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / file.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return snapshot


def save_parquet_dataset(folder: Path, sizes: dict[str, int], num_classes: int = 4,
                         image_size: int = 8, mode: str = "RGB", seed: int = 0) -> Path:
    """A Hugging Face dataset folder as the Hub holds one: ``data/<split>-*.parquet`` with
    the columns ``img`` (an Image), ``label`` (a ClassLabel: item i has label i mod
    ``num_classes``) and ``text`` (``"a photo of <label>"``), and a README whose YAML names
    the splits."""
    import datasets
    import numpy as np
    from PIL import Image

    generator = np.random.default_rng(seed)
    shape = (image_size, image_size) + ((3,) if mode == "RGB" else ())
    features = datasets.Features({
        "img": datasets.Image(), "text": datasets.Value("string"),
        "label": datasets.ClassLabel(names=[f"class{c}" for c in range(num_classes)])})
    (folder / "data").mkdir(parents=True)
    for split, count in sizes.items():
        labels = [i % num_classes for i in range(count)]
        rows = {"img": [Image.fromarray(generator.integers(0, 256, shape, dtype=np.uint8))
                        for _ in range(count)],
                "text": [f"a photo of {label}" for label in labels], "label": labels}
        datasets.Dataset.from_dict(rows, features=features).to_parquet(
            folder / "data" / f"{split}-00000-of-00001.parquet")
    splits = "".join(f"  - split: {s}\n    path: data/{s}-*\n" for s in sizes)
    (folder / "README.md").write_text(f"---\nconfigs:\n- config_name: default\n  data_files:\n"
                                      f"{splits}---\n")
    return folder
