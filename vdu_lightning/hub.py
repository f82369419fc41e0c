"""Model names that may be Hugging Face Hub repository IDs, resolved to a local folder.

Every loader of the project reads local files; this module turns a Hub ID
(``google/ddpm-cifar10-32``, ``owner/name@revision``) into the folder of its snapshot in
huggingface_hub's cache, downloading what is missing unless ``HF_HUB_OFFLINE=1`` (then the
cache alone is read, and a miss is an error that names the repository). Only JSON, text and
safetensors files are fetched (for a pipeline, of the components its ``model_index.json``
lists and the project loads): pickled weights (``*.bin``, ``*.ckpt``) and code never reach
the disk through here. Weights a local folder holds as ``.bin`` are read with
``torch.load(weights_only=True)``, which refuses pickled objects.

A local path always wins over a Hub ID of the same spelling.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from huggingface_hub import constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    HFValidationError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

#: ``owner/name`` as the Hub spells repositories, optionally ``@revision`` (a branch, tag or
#: commit, as huggingface_hub's file-system paths write it).
_REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
#: Files fetched for a bare model repository or a sub-folder: configurations, tokenizers and
#: safetensors weights, never a pickle.
_SAFE_FILES = ["*.json", "*.txt", "*.safetensors", "*.model"]
#: Alternative copies of the same weights that diffusers would not load by default.
_VARIANTS = ["*.fp16.*", "*.bf16.*", "*.non_ema.*", "*.ema.*", "*.onnx*", "*.msgpack"]
#: Pipeline components that no module of the project loads (and that cost ~1.2 GB in SD).
_UNUSED_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")
#: Names that are files, never repositories: a missing checkpoint keeps its own error.
_FILE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".safetensors", ".json", ".yaml", ".png")


#: Snapshot folders resolved in this process, by (repo, revision, subfolder, cache).
_RESOLVED: dict[tuple[str, str | None, str | None, str], Path] = {}


class HubModelNotFound(FileNotFoundError):
    """A name that is neither a local path nor a Hub repository this machine can read."""


def split_hub_id(name: str | os.PathLike) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``name`` is spelt as a Hub ID and no local path has that
    name; None otherwise (a file name such as ``runs/last.ckpt`` is never an ID)."""
    if Path(name).exists() or str(name).lower().endswith(_FILE_SUFFIXES):
        return None
    match = _REPO_ID.match(str(name))
    if match is None:
        return None
    try:
        validate_repo_id(match["repo"])
    except HFValidationError:  # e.g. "runs/exp--1": a path, not a repository
        return None
    return match["repo"], match["revision"]


def fetch_advice(repo_id: str, repo_type: str = "model") -> str:
    """The command that fills the cache with what the project reads (no pickles)."""
    kind = "" if repo_type == "model" else f" --repo-type {repo_type}"
    return f'hf download {repo_id}{kind} --include "*.json" "*.txt" "*.safetensors" ' \
           '"*.model" "*.parquet" "*.md"'


def not_found(what: str, err: Exception, repo_id: str, repo_type: str = "model"
              ) -> HubModelNotFound:
    """The error for a Hub name that could not be read, saying what to do."""
    if isinstance(err, LocalEntryNotFoundError):
        return HubModelNotFound(
            f"{what} is not a local path, and not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE})" + (
                ": HF_HUB_OFFLINE=1 reads the cache only. Download it once where there is a "
                f"network ({fetch_advice(repo_id, repo_type)}), or unset HF_HUB_OFFLINE"
                if constants.HF_HUB_OFFLINE else f": {err}"))
    if isinstance(err, (RepositoryNotFoundError, RevisionNotFoundError)):
        return HubModelNotFound(f"{what} is not a local path, and the Hub has no such "
                                f"repository or revision (private ones need a token): {err}")
    return HubModelNotFound(f"{what} is not a local path, and could not be fetched from the "
                            f"Hub: {err}")


def resolve_model(name: str | os.PathLike, revision: str | None = None,
                  subfolder: str | None = None) -> Path:
    """The local folder (or file) that ``name`` stands for.

    Args:
        name: a local path, or a Hub repository ID, optionally with ``@revision``.
        revision: the branch, tag or commit of a Hub ID without ``@revision`` (one that has
            its own must agree); ignored for a local path.
        subfolder: a part of the model (e.g. ``unet``), inside the local folder or the
            repository; only that part is fetched from the Hub.

    A name that is neither a local path nor spelt as a Hub ID comes back as a path, for the
    caller's own "not found" error. A Hub ID is resolved once per process (and cache): every
    later load in the run (the original network, evaluations, the export) reads the same
    snapshot without asking the Hub again, so a branch moved mid-run is not seen. A resumed
    run resolves anew: name a commit (``@<sha>``) to pin it across runs.
    """
    hub = split_hub_id(name)
    if hub is None:
        path = Path(name)
        return path / subfolder if subfolder and path.is_dir() else path
    repo_id, at_revision = hub
    if revision and at_revision and revision != at_revision:
        raise ValueError(f"{name} names revision {at_revision!r} but revision={revision!r} "
                         "was given too: give one")
    key = (repo_id, at_revision or revision, subfolder, str(constants.HF_HUB_CACHE))
    if key not in _RESOLVED:
        _RESOLVED[key] = Path(_download(repo_id, at_revision or revision, subfolder))
    folder = _RESOLVED[key]
    return folder / subfolder if subfolder else folder


def snapshot_commit(name: str | os.PathLike) -> str | None:
    """The commit a Hub ID resolved to in this process (its snapshot folder's name), or
    None for a local path or a name not resolved yet."""
    hub = split_hub_id(name)
    folders = [] if hub is None else [
        folder for (repo, revision, _, _), folder in _RESOLVED.items()
        if repo == hub[0] and revision == hub[1]]
    return folders[-1].name if folders else None


def _download(repo_id: str, revision: str | None, subfolder: str | None) -> str:
    where = f"{repo_id}" + (f"@{revision}" if revision else "")
    try:
        if subfolder:
            patterns = [f"{subfolder}/{p}" for p in _SAFE_FILES]
        else:
            # A pipeline: the components its model_index.json lists (none of the unused
            # ones), each with the safe patterns, so no component folder brings a pickle.
            index = _model_index(repo_id, revision)
            parts = None if index is None else [
                name for name, value in index.items() if not name.startswith("_")
                and isinstance(value, list) and name not in _UNUSED_COMPONENTS]
            patterns = (_SAFE_FILES if parts is None else ["model_index.json"] + [
                f"{part}/{p}" for part in parts for p in _SAFE_FILES])
        return snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                 ignore_patterns=_VARIANTS)
    except (HfHubHTTPError, OSError) as err:
        raise not_found(where, err, repo_id) from err


def _model_index(repo_id: str, revision: str | None) -> dict | None:
    """The repository's ``model_index.json`` (a diffusers pipeline), or None."""
    try:
        path = hf_hub_download(repo_id, "model_index.json", revision=revision)
    except EntryNotFoundError:
        # Also offline and not cached (LocalEntryNotFoundError): no such file, or no such
        # repository in the cache; the snapshot download that follows tells which.
        return None
    return json.loads(Path(path).read_text(encoding="utf-8"))


def push_folder(folder: str | os.PathLike, repo_id: str, private: bool = True,
                message: str = "Upload a model exported by vdu_lightning") -> str:
    """Upload an exported folder (weights, card, picture) to the Hub model repository
    ``repo_id``, creating it if needed (private unless ``private=False``); return the
    commit's URL. Needs a network and a token (``hf auth login`` or ``HF_TOKEN``)."""
    from huggingface_hub import create_repo, upload_folder

    if constants.HF_HUB_OFFLINE:
        raise ConnectionError(f"cannot push {folder} to the Hub repository {repo_id}: "
                              "HF_HUB_OFFLINE=1 forbids network access")
    create_repo(repo_id, private=private, exist_ok=True)
    return str(upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=message))
