"""Exported models carry a README model card: method, hyperparameters, forget set, the run's
evaluation and its before/after grid, readable by huggingface_hub."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from diffusers import DDPMPipeline, StableDiffusionPipeline
from huggingface_hub import ModelCard

from conftest import TINY_UNET
from evaluation_helpers import tiny_classifier
from hub_cache import add_to_hub_cache
from tiny_sd import save_tiny_sd
from vdu_lightning import (
    DiffusionModule,
    ForgetSetDataModule,
    ParameterPrior,
    TextToImageVDUModule,
    VDUModule,
)
from vdu_lightning.callbacks import ExportPretrained, UnlearningEvaluation
from vdu_lightning.model_card import PICTURE


def _pretrained(path: Path) -> Path:
    torch.manual_seed(0)
    DiffusionModule(unet=dict(TINY_UNET), num_train_timesteps=100).save_pretrained(path)
    return path


def _vdu(pretrained: str, cls: type = VDUModule) -> VDUModule:
    module = cls(pretrained, gamma=0.5, lr=1e-3, sample_steps=2)
    generator = torch.Generator().manual_seed(1)
    module.set_prior(ParameterPrior.from_tensors(
        [{n: p.detach() + 1e-2 * torch.randn(p.shape, generator=generator)
          for n, p in module.unet.named_parameters()} for _ in range(3)], "independent"))
    return module


def _fit(module: pl.LightningModule, callbacks: list) -> pl.Trainer:
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=2,
                         limit_val_batches=1, num_sanity_val_steps=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=callbacks)
    trainer.fit(module, datamodule=ForgetSetDataModule(
        dataset="digits", forget_classes=[3], forget_size=32, eval_size=8, batch_size=16))
    return trainer


@pytest.mark.filterwarnings("ignore:.*rank-deficient covariance")
def test_the_export_of_an_evaluated_run_carries_its_card_and_grid(tmp_path: Path) -> None:
    tiny_classifier(tmp_path / "classifier")
    evaluation = UnlearningEvaluation(
        classifier=str(tmp_path / "classifier"), dirpath="eval", during_fit=True,
        num_samples=16, num_steps=2, batch_size=16, num_reference=40, grid_images=4,
        likelihood_timesteps=2)
    module = _vdu(str(_pretrained(tmp_path / "ddpm")))
    _fit(module, [evaluation, ExportPretrained("unlearned")])

    export = tmp_path / "unlearned"
    card = ModelCard.load(export / "README.md")
    assert card.data.library_name == "diffusers"
    assert card.data.pipeline_tag == "unconditional-image-generation"
    assert {"vdu-lightning", "machine-unlearning", "vdumodule"} <= set(card.data.tags)
    assert card.data.base_model is None  # a local folder is no Hub model to link
    assert f"Made from `{tmp_path / 'ddpm'}` by `VDUModule` to forget class(es) [3] of the " \
           "data set `digits` (at most 32 images)." in card.text
    assert "| gamma | `0.5` |" in card.text and "| lr | `0.001` |" in card.text
    metrics = evaluation.results["metrics"]
    assert len(metrics) > 10
    for name, value in metrics.items():  # an undefined PUL (no original 3 drawn) says so
        assert f"| {name} | {'undefined' if math.isnan(value) else format(value, '.4g')} |" \
            in card.text
    assert f"At step {evaluation.results['step']} (fit)" in card.text
    assert f"![left: the base model, right: this model, same seeds]({PICTURE})" in card.text
    assert (export / PICTURE).read_bytes() == evaluation.picture.read_bytes()
    assert "DDPMPipeline.from_pretrained('unlearned')" in card.text
    DDPMPipeline.from_pretrained(export, local_files_only=True)  # the folder still loads


def test_an_export_without_evaluation_says_so_and_names_a_hub_base(
        tmp_path: Path, hub_cache: Path) -> None:
    snapshot = add_to_hub_cache(hub_cache, "someone/tiny-ddpm", _pretrained(tmp_path / "ddpm"))
    _vdu("someone/tiny-ddpm@main").save_pretrained("plain")
    card = ModelCard.load(tmp_path / "plain" / "README.md")
    assert card.data.base_model == "someone/tiny-ddpm"  # the repository, not its revision
    assert f"Made from `someone/tiny-ddpm@main` (commit `{snapshot.name}`)" in card.text
    assert "Not evaluated in the run that exported it" in card.text
    assert not (tmp_path / "plain" / PICTURE).exists()


def test_a_subclass_whose_save_pretrained_takes_no_card_still_exports(tmp_path: Path) -> None:
    class OwnExport(VDUModule):
        def save_pretrained(self, path):  # a user's override, written before cards existed
            super().save_pretrained(path)

    _fit(_vdu(str(_pretrained(tmp_path / "ddpm")), OwnExport), [ExportPretrained("unlearned")])
    assert (tmp_path / "unlearned" / "README.md").is_file()  # the module's own card


def test_a_text_to_image_export_is_a_text_to_image_card(tmp_path: Path) -> None:
    module = TextToImageVDUModule(str(save_tiny_sd(tmp_path / "sd")))
    module.save_pretrained("out")
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.pipeline_tag == "text-to-image"
    assert "StableDiffusionPipeline.from_pretrained('out')" in card.text
    StableDiffusionPipeline.from_pretrained(tmp_path / "out", local_files_only=True)


def test_push_to_hub_uploads_the_export_or_warns_and_keeps_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pretrained = str(_pretrained(tmp_path / "ddpm"))
    # Offline (as in every test): the upload is refused by name, the export stays.
    with pytest.warns(UserWarning, match=r"unlearned was written, but pushing it to "
                                         r"someone/forgot-3 failed: .*HF_HUB_OFFLINE=1"):
        _fit(_vdu(pretrained), [ExportPretrained("unlearned", push_to_hub="someone/forgot-3")])
    assert (tmp_path / "unlearned" / "README.md").is_file()

    # With a network: the calls huggingface_hub would get (recorded: no network here).
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "create_repo",
                        lambda repo_id, **kw: calls.append(("create", repo_id, kw)))
    monkeypatch.setattr(huggingface_hub, "upload_folder",
                        lambda **kw: calls.append(("upload", kw)) or "https://hub/commit/1")
    _fit(_vdu(pretrained), [ExportPretrained("again", push_to_hub="someone/forgot-3")])
    assert calls == [("create", "someone/forgot-3", {"private": True, "exist_ok": True}),
                     ("upload", {"repo_id": "someone/forgot-3", "folder_path": "again",
                                 "commit_message": "Upload a model exported by vdu_lightning"})]
