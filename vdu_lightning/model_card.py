"""The README model card of an exported model (huggingface_hub's ``ModelCard``).

An exported directory says what it is, how it was made (base model, method,
hyperparameters), what it was made to forget and how well (the evaluation's numbers and its
before/after grid), so that it can be published on the Hub as it is. The card is written
inside the export's atomic directory: the card and the weights appear together or not at all.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from vdu_lightning.files import atomic_file, atomic_write_text
from vdu_lightning.hub import snapshot_commit, split_hub_id

#: The name of the before/after picture beside the card.
PICTURE = "before_after.png"
#: How each kind of export is loaded, for the card's "Use" section.
USAGE = {
    "DDPMPipeline": "from diffusers import DDPMPipeline\n\n"
                    "pipeline = DDPMPipeline.from_pretrained({where!r})\n"
                    "images = pipeline(batch_size=4).images",
    "StableDiffusionPipeline": "from diffusers import StableDiffusionPipeline\n\n"
                               "pipeline = StableDiffusionPipeline.from_pretrained({where!r})\n"
                               "image = pipeline(\"a photo\").images[0]",
    "OneStepGeneratorPipeline":
        "from vdu_lightning.methods.sfd import OneStepGeneratorPipeline\n\n"
        "pipeline = OneStepGeneratorPipeline.from_pretrained({where!r})\n"
        "images = pipeline([0, 2, 3]).images  # one step per label",
    "OneStepTextToImagePipeline":
        "from vdu_lightning.methods.sfd import OneStepTextToImagePipeline\n\n"
        "pipeline = OneStepTextToImagePipeline.from_pretrained({where!r})\n"
        "image = pipeline(\"a photo\").images[0]  # one step per prompt",
    "label-conditional": "import torch\nfrom vdu_lightning import DiffusionModule\n\n"
                         "model = DiffusionModule.from_pretrained({where!r})\n"
                         "images = model.sample(4, labels=torch.tensor([0, 1, 2, 3]))",
}
PIPELINE_TAGS = {"DDPMPipeline": "unconditional-image-generation",
                 "label-conditional": "unconditional-image-generation",
                 "StableDiffusionPipeline": "text-to-image",
                 "OneStepGeneratorPipeline": "unconditional-image-generation",
                 "OneStepTextToImagePipeline": "text-to-image"}


@dataclass
class ExportCard:
    """A card and the picture it shows, written together into an export's folder."""

    card: ModelCard
    picture: Path | None = None

    def write(self, folder: str | Path) -> None:
        folder = Path(folder)
        atomic_write_text(folder / "README.md", str(self.card))
        if self.picture is not None:
            with atomic_file(folder / PICTURE) as tmp:
                shutil.copyfile(self.picture, tmp)


def model_card(method: str, pipeline_class: str, hyperparameters: Mapping[str, Any],
               base_model: str | None = None, forget_set: str | None = None,
               evaluation: Mapping[str, Any] | None = None,
               picture: str | Path | None = None, where: str = "path/to/this/folder"
               ) -> ExportCard:
    """The card of a model made by ``method`` (a class name) from ``base_model``.

    Args:
        pipeline_class: how the folder is loaded (a key of ``USAGE``).
        hyperparameters: the method's arguments, as its hparams hold them.
        forget_set: what the model was made to forget, in words.
        evaluation: the latest evaluation's results (an evaluation callback's ``results``,
            with ``metrics``, ``step`` and ``stage``); None: not evaluated.
        picture: the evaluation's before/after PNG, copied beside the card.
    """
    hub = split_hub_id(base_model) if base_model else None
    hub_base = hub[0] if hub else None  # the metadata names a repository, not a revision
    data = ModelCardData(library_name="diffusers", pipeline_tag=PIPELINE_TAGS[pipeline_class],
                         base_model=hub_base, tags=["vdu-lightning", "machine-unlearning",
                                                    method.lower()])
    lines = [f"# {method} model made with vdu_lightning", ""]
    commit = snapshot_commit(base_model) if base_model else None
    if base_model:
        lines += [f"Made from `{base_model}`" + (f" (commit `{commit}`)" if commit else "")
                  + f" by `{method}`"
                  + (f" to forget {forget_set}." if forget_set else "."), ""]
    lines += ["## How it was made", "", "| hyperparameter | value |", "|---|---|"]
    lines += [f"| {name} | `{_plain(value)}` |" for name, value in sorted(hyperparameters.items())
              if not name.startswith("_")]
    if hyperparameters.get("num_classes") and pipeline_class == "DDPMPipeline":
        pipeline_class = "label-conditional"  # DDPMPipeline cannot pass the labels
    lines += ["", "## Evaluation", ""]
    if evaluation and evaluation.get("metrics"):
        lines += [f"At step {evaluation.get('step')} ({evaluation.get('stage')}); "
                  "see vdu_lightning's docs/evaluation.md for what each measure means.", "",
                  "| measure | value |", "|---|---|"]
        lines += [f"| {name} | {'undefined' if value is None else format(value, '.4g')} |"
                  for name, value in evaluation["metrics"].items()]
    else:
        lines += ["Not evaluated in the run that exported it: add an evaluation callback "
                  "(e.g. `UnlearningEvaluation`) and validate before exporting."]
    if picture is not None:
        lines += ["", f"![left: the base model, right: this model, same seeds]({PICTURE})"]
    lines += ["", "## Use", "", "```python", USAGE[pipeline_class].format(where=where), "```",
              ""]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
    return ExportCard(card, None if picture is None else Path(picture))


def describe_forget_set(datamodule: Any) -> str | None:
    """What a ``ForgetSetDataModule`` holds as its forget set, in words (None: unknown)."""
    hparams = getattr(datamodule, "hparams", {})
    if getattr(datamodule, "forget_classes", None):
        return (f"class(es) {list(datamodule.forget_classes)} of the data set "
                f"`{hparams.get('dataset')}` (at most {hparams.get('forget_size')} images)")
    if hparams.get("forget_where"):
        return (f"the rows of `{hparams.get('dataset')}` where {hparams['forget_where']} (at "
                f"most {hparams.get('forget_size')})")
    if hparams.get("forget_folder"):
        return (f"the images of the folder `{Path(hparams['forget_folder']).name}` (at most "
                f"{hparams.get('forget_size')})")
    return None


def _plain(value: Any) -> str:
    """A value as one table cell: JSON, with the characters that would break the row escaped."""
    try:
        text = json.dumps(value)
    except TypeError:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")
