"""Models named by Hub ID, read offline from a Hub cache built in the test."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import TINY_UNET
from hub_cache import add_to_hub_cache
from tiny_sd import save_tiny_sd
from vdu_lightning import DiffusionModule, ParameterPrior, TextToImageVDUModule, VDUModule
from vdu_lightning.cli import VDUCLI, main
from vdu_lightning.hub import HubModelNotFound, resolve_model, split_hub_id


def _tiny_ddpm(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    DiffusionModule(unet=dict(TINY_UNET), num_train_timesteps=100).save_pretrained(path)
    return path


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    return all(torch.equal(x, y) for x, y in pairs)


def test_a_hub_id_and_its_revisions_load_from_the_cache(tmp_path: Path, hub_cache: Path) -> None:
    first, second = _tiny_ddpm(tmp_path / "v0", 0), _tiny_ddpm(tmp_path / "v1", 1)
    add_to_hub_cache(hub_cache, "someone/tiny-ddpm", first)
    add_to_hub_cache(hub_cache, "someone/tiny-ddpm", second, revision="v1")

    by_id = VDUModule("someone/tiny-ddpm", gamma=0.5)
    local = VDUModule(str(first), gamma=0.5)
    tagged = VDUModule("someone/tiny-ddpm@v1", gamma=0.5)
    assert _same_weights(by_id.unet, local.unet)
    assert _same_weights(tagged.unet, VDUModule(str(second), gamma=0.5).unet)
    assert not _same_weights(tagged.unet, by_id.unet)
    assert by_id.scheduler.config.num_train_timesteps == 100  # the repository's scheduler
    assert DiffusionModule.from_pretrained("someone/tiny-ddpm").unet.config.sample_size == 8


def test_a_local_folder_wins_over_a_hub_id_of_the_same_spelling(tmp_path: Path,
                                                                hub_cache: Path) -> None:
    add_to_hub_cache(hub_cache, "runs/ddpm", _tiny_ddpm(tmp_path / "hub", 0))
    local = _tiny_ddpm(tmp_path / "runs" / "ddpm", 1)  # tmp_path is the working directory
    assert split_hub_id("runs/ddpm") is None
    assert resolve_model("runs/ddpm") == Path("runs/ddpm")
    assert _same_weights(VDUModule("runs/ddpm").unet, VDUModule(str(local)).unet)


def test_an_id_missing_from_the_cache_is_named_with_what_to_do(hub_cache: Path) -> None:
    with pytest.raises(HubModelNotFound, match=r"someone/absent is not a local path, and not in "
                       r"the Hugging Face cache .*HF_HUB_OFFLINE=1 reads the cache only"):
        VDUModule("someone/absent")
    with pytest.raises(HubModelNotFound, match="someone/absent@v2"):
        DiffusionModule.from_pretrained("someone/absent@v2")
    # A name that is not spelt as an ID keeps its own error.
    with pytest.raises(FileNotFoundError, match="not found: missing"):
        VDUModule("missing")


def test_a_repository_without_safetensors_weights_is_refused_by_name(
        tmp_path: Path, hub_cache: Path) -> None:
    folder = _tiny_ddpm(tmp_path / "model", 0)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    add_to_hub_cache(hub_cache, "someone/no-weights", folder)
    with pytest.raises(FileNotFoundError, match=r"holds no UNet weights: expected "
                       r"diffusion_pytorch_model\.safetensors"):
        VDUModule("someone/no-weights")


def test_the_cli_fits_a_model_named_by_id(tmp_path: Path, hub_cache: Path) -> None:
    add_to_hub_cache(hub_cache, "someone/tiny-ddpm", _tiny_ddpm(tmp_path / "m", 0))
    cli = VDUCLI(args=[
        "fit", "--model", "vdu_lightning.RetainFinetuneModule",
        "--model.pretrained", "someone/tiny-ddpm", "--model.lr", "1e-3",
        "--data", "vdu_lightning.ForgetSetDataModule", "--data.dataset", "digits",
        "--data.forget_classes", "[3]", "--data.forget_size", "32", "--data.retain_size", "32",
        "--data.batch_size", "16",
        "--trainer.max_steps", "2", "--trainer.logger", "false",
        "--trainer.enable_checkpointing", "false", "--trainer.limit_val_batches", "0",
        "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu"])
    assert cli.trainer.global_step == 2
    assert cli.model.hparams.pretrained == "someone/tiny-ddpm"


def test_a_prior_over_a_hub_lineage_reads_the_unet_subfolder_only(
        tmp_path: Path, hub_cache: Path, capsys) -> None:
    ids = []
    for seed in range(3):
        folder = save_tiny_sd(tmp_path / f"sd-{seed}", seed)
        ids.append(f"someone/tiny-sd-v1-{seed + 1}")
        add_to_hub_cache(hub_cache, ids[-1], folder)
    main(["prior", "--checkpoints", *ids, "--subfolder", "unet", "--include", "*attn2.*",
          "--out", "sd_prior.safetensors"])
    assert "wrote sd_prior.safetensors: prior: K=3" in capsys.readouterr().out
    from_hub = ParameterPrior.load("sd_prior.safetensors")
    local = ParameterPrior.from_checkpoints([tmp_path / f"sd-{s}" / "unet" for s in range(3)],
                                            include=["*attn2.*"])
    assert from_hub.names and all("attn2." in name for name in from_hub.names)
    assert from_hub.names == local.names
    for name in local.names:
        torch.testing.assert_close(from_hub.mean[name], local.mean[name])
        torch.testing.assert_close(from_hub.var[name], local.var[name])

    with pytest.raises(SystemExit):
        main(["prior", "--checkpoints", ids[0], "someone/tiny-sd-v9", "--subfolder", "unet",
              "--out", "other.safetensors"])
    assert "someone/tiny-sd-v9 is not a local path" in capsys.readouterr().err
    assert not Path("other.safetensors").exists()


def test_a_text_to_image_pipeline_by_id(tmp_path: Path, hub_cache: Path) -> None:
    folder = save_tiny_sd(tmp_path / "sd", 0)
    add_to_hub_cache(hub_cache, "someone/tiny-sd", folder)
    by_id, local = TextToImageVDUModule("someone/tiny-sd"), TextToImageVDUModule(str(folder))
    assert _same_weights(by_id.unet, local.unet)
    for pipeline, out in (("someone/tiny-sd", "by_id"), (str(folder), "local")):
        main(["generate-forget-set", "--pipeline", pipeline, "--prompt", "a cat", "-n", "2",
              "--out", out, "--num-inference-steps", "2", "--device", "cpu"])
    assert [p.read_bytes() for p in sorted(Path("by_id").glob("*.png"))] == \
        [p.read_bytes() for p in sorted(Path("local").glob("*.png"))]
    assert len(list(Path("by_id").glob("*.png"))) == 2


def test_names_that_are_files_or_invalid_ids_are_paths_and_revisions_must_agree(
        tmp_path: Path, hub_cache: Path) -> None:
    for name in ("runs/last.ckpt", "runs/exp--1", "a/b/c", "/abs/path"):
        assert split_hub_id(name) is None, name
    assert split_hub_id("google/ddpm-cifar10-32@v1.0") == ("google/ddpm-cifar10-32", "v1.0")
    add_to_hub_cache(hub_cache, "someone/tiny-ddpm", _tiny_ddpm(tmp_path / "v0", 0))
    add_to_hub_cache(hub_cache, "someone/tiny-ddpm", _tiny_ddpm(tmp_path / "v1", 1),
                     revision="v1")
    assert resolve_model("someone/tiny-ddpm", revision="v1") == \
        resolve_model("someone/tiny-ddpm@v1") != resolve_model("someone/tiny-ddpm")
    with pytest.raises(ValueError, match=r"names revision 'v1' but revision='main' was given"):
        resolve_model("someone/tiny-ddpm@v1", revision="main")


def test_only_safe_files_of_the_loaded_components_are_asked_for(
        tmp_path: Path, hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vdu_lightning import hub

    asked = []
    real = hub.snapshot_download
    monkeypatch.setattr(hub, "snapshot_download",
                        lambda *a, **kw: asked.append(kw) or real(*a, **kw))
    folder = save_tiny_sd(tmp_path / "sd", 0)
    (folder / "model_index.json").write_text(  # as SD repositories list them
        (folder / "model_index.json").read_text().replace(
            '"_class_name"', '"safety_checker": ["stable_diffusion", "Checker"], "_class_name"'))
    add_to_hub_cache(hub_cache, "someone/tiny-sd", folder)
    resolve_model("someone/tiny-sd")
    resolve_model("someone/tiny-sd", subfolder="unet")
    pipeline, unet = (call["allow_patterns"] for call in asked)
    assert "model_index.json" in pipeline and "unet/*.safetensors" in pipeline
    assert {p.split("/")[0] for p in pipeline} == {
        "model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"}
    assert all(p.startswith("unet/") for p in unet)
    for pattern in pipeline + unet:  # never a pickle or code
        assert not pattern.endswith((".bin", ".ckpt", ".pt", ".pth", ".pkl", ".py", "*")), pattern


def test_a_flat_repository_reads_its_scheduler_beside_the_unet(tmp_path: Path) -> None:
    from diffusers import DDPMScheduler

    from vdu_lightning.diffusion import load_pretrained

    folder = _tiny_ddpm(tmp_path / "pipeline", 0)
    flat = tmp_path / "flat"
    (folder / "unet").rename(flat)
    DDPMScheduler(num_train_timesteps=100, variance_type="fixed_large").save_pretrained(flat)
    unet, scheduler = load_pretrained(flat)
    assert scheduler.config.num_train_timesteps == 100
    assert scheduler.config.variance_type == "fixed_large"


def test_a_run_keeps_the_snapshot_it_resolved_first(tmp_path: Path, hub_cache: Path) -> None:
    first = add_to_hub_cache(hub_cache, "someone/moving", _tiny_ddpm(tmp_path / "v0", 0))
    module = VDUModule("someone/moving")
    # The branch moves while the run goes on: the run's later loads keep the first commit.
    moved = add_to_hub_cache(hub_cache, "someone/moving", _tiny_ddpm(tmp_path / "v1", 1))
    assert moved != first and resolve_model("someone/moving") == first
    assert _same_weights(module.original_unet, VDUModule(str(tmp_path / "v0")).unet)
