"""Model names that may be Hugging Face Hub repository IDs, resolved to a local folder.

Every loader of the project reads local files; this module turns a Hub ID
(``google/ddpm-cifar10-32``, ``owner/name@revision``) into the folder of its snapshot in
huggingface_hub's cache, downloading what is missing unless ``HF_HUB_OFFLINE=1`` (then the
cache alone is read, and a miss is an error that names the repository). Only JSON, text and
safetensors files are fetched: pickled weights (``*.bin``, ``*.ckpt``) never reach the disk
through here, and the loaders refuse the ones a local folder holds.

A local path always wins over a Hub ID of the same spelling.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from huggingface_hub import constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

#: ``owner/name`` as the Hub spells repositories, optionally ``@revision`` (a branch, tag or
#: commit, as huggingface_hub's file-system paths write it).
_REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
#: Files fetched for a bare model repository or a sub-folder: configurations, tokenizers and
#: safetensors weights, never a pickle.
_SAFE_FILES = ["*.json", "*.txt", "*.safetensors", "*.model"]
#: Alternative copies of the same weights that diffusers would not load by default.
_VARIANTS = ["*.fp16.*", "*.bf16.*", "*.non_ema.*", "*.ema.*", "*.onnx*", "*.msgpack"]


class HubModelNotFound(FileNotFoundError):
    """A name that is neither a local path nor a Hub repository this machine can read."""


def split_hub_id(name: str | os.PathLike) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``name`` is spelt as a Hub ID and no local path has that
    name; None otherwise."""
    if Path(name).exists():
        return None
    match = _REPO_ID.match(str(name))
    return (match["repo"], match["revision"]) if match else None


def resolve_model(name: str | os.PathLike, revision: str | None = None,
                  subfolder: str | None = None) -> Path:
    """The local folder (or file) that ``name`` stands for.

    Args:
        name: a local path, or a Hub repository ID, optionally with ``@revision``.
        revision: the branch, tag or commit of a Hub ID (wins over ``@revision``); ignored
            for a local path.
        subfolder: a part of the model (e.g. ``unet``), inside the local folder or the
            repository; only that part is fetched from the Hub.

    A name that is neither a local path nor spelt as a Hub ID comes back as a path, for the
    caller's own "not found" error.
    """
    hub = split_hub_id(name)
    if hub is None:
        path = Path(name)
        return path / subfolder if subfolder and path.is_dir() else path
    repo_id, at_revision = hub
    revision = revision or at_revision
    folder = Path(_download(repo_id, revision, subfolder))
    return folder / subfolder if subfolder else folder


def _download(repo_id: str, revision: str | None, subfolder: str | None) -> str:
    where = f"{repo_id}" + (f"@{revision}" if revision else "")
    try:
        if subfolder:
            return snapshot_download(repo_id, revision=revision,
                                     allow_patterns=[f"{subfolder}/{p}" for p in _SAFE_FILES],
                                     ignore_patterns=_VARIANTS)
        if _is_pipeline(repo_id, revision):
            # diffusers picks the components of model_index.json, the default variant and
            # safetensors only (an error names a pipeline that offers none).
            from diffusers import DiffusionPipeline

            return DiffusionPipeline.download(repo_id, revision=revision, use_safetensors=True)
        return snapshot_download(repo_id, revision=revision, allow_patterns=_SAFE_FILES,
                                 ignore_patterns=_VARIANTS)
    except LocalEntryNotFoundError as err:
        raise HubModelNotFound(
            f"{where} is not a local path, and not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE})"
            + (": HF_HUB_OFFLINE=1 reads the cache only. Download it once where there is a "
               f"network (`hf download {repo_id}`), or unset HF_HUB_OFFLINE"
               if constants.HF_HUB_OFFLINE else f": {err}")
        ) from err
    except (RepositoryNotFoundError, RevisionNotFoundError) as err:
        raise HubModelNotFound(f"{where} is not a local path, and the Hub has no such "
                               f"repository or revision (private ones need a token): "
                               f"{err}") from err
    except (HfHubHTTPError, OSError) as err:  # diffusers' errors are OSErrors
        raise HubModelNotFound(f"{where}: could not be fetched from the Hub: {err}") from err


def _is_pipeline(repo_id: str, revision: str | None) -> bool:
    """Whether the repository holds a diffusers pipeline (a ``model_index.json``)."""
    try:
        hf_hub_download(repo_id, "model_index.json", revision=revision)
    except EntryNotFoundError:
        # Also offline and not cached (LocalEntryNotFoundError): no such file, or no such
        # repository in the cache; the snapshot download that follows tells which.
        return False
    return True


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
