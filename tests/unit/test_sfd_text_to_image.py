"""TextToImageSFDModule on a tiny SD 1.x pipeline: what moves, what the teacher sees, the
exported one-step pipeline, an exact resume, the shipped config through the CLI."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from conftest import CONFIGS
from tiny_sd import IMAGE_SIZE, save_tiny_sd, tiny_sd_pipeline
from vdu_lightning.cli import main
from vdu_lightning.methods.sfd import OneStepTextToImagePipeline, TextToImageSFDModule

FORGET = ["a painting by jane doe", "jane doe style"]
OVERRIDES = ["a painting", "a style"]
RETAIN = ["a red car", "a house", "a dog"]


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_sd(tmp_path_factory.mktemp("sd") / "pipeline")


def sfd(sd_dir: Path, **kwargs) -> TextToImageSFDModule:
    kwargs = {"forget_prompts": FORGET, "retain_prompts": RETAIN, "override_prompts": OVERRIDES,
              "t_min": 20, "t_max": 980, "t_init": 625, "lr": 1e-3, "batch_size": 6,
              "steps_per_epoch": 3, **kwargs}
    return TextToImageSFDModule(str(sd_dir), **kwargs)


def fit(module: pl.LightningModule, steps: int, **trainer_args) -> None:
    args = {"accelerator": "cpu", "max_steps": steps, "logger": False,
            "enable_checkpointing": False, "enable_progress_bar": False,
            "enable_model_summary": False, **trainer_args}
    pl.Trainer(**args).fit(module)


def weights(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in network.named_parameters()}


def test_only_the_generator_and_the_fake_score_move(sd_dir: Path) -> None:
    module = sfd(sd_dir)
    networks = {"generator": module.generator, "fake": module.fake_score,
                "teacher": module.teacher, "vae": module.frozen.get("vae"),
                "text_encoder": module.frozen.get("text_encoder")}
    before = {name: weights(net) for name, net in networks.items()}
    fit(module, 4)
    for name, net in networks.items():
        moved = any(not torch.equal(p, before[name][n]) for n, p in net.named_parameters())
        assert moved == (name in ("generator", "fake")), name
    # Only the three copies that train or average are checkpointed.
    assert {key.split(".")[0] for key in module.state_dict()} == {
        "generator", "fake_score", "ema_generator"}


def test_the_teacher_sees_the_override_for_forget_prompts_only(sd_dir: Path) -> None:
    module = sfd(sd_dir, batch_size=40)
    embeddings = module.prompt_embeddings()
    seen: dict[str, list[torch.Tensor]] = {"generator": [], "fake": [], "teacher": []}
    for name, net in (("generator", module.generator), ("fake", module.fake_score),
                      ("teacher", module.teacher)):
        net.register_forward_pre_hook(
            lambda _, args, kwargs, name=name: seen[name].append(
                kwargs["encoder_hidden_states"].clone()), with_kwargs=True)
    fit(module, 2)

    def prompts_of(context: torch.Tensor) -> list[str]:
        # Each row's prompt: the table entry whose embedding it is.
        matches = (context[:, None] == embeddings[None]).flatten(2).all(-1)
        assert (matches.sum(1) == 1).all()
        return [module.prompts[i] for i in matches.int().argmax(1)]

    drawn = prompts_of(seen["generator"][0])
    assert set(drawn) <= set(FORGET + RETAIN) and set(drawn) & set(FORGET)
    assert set(drawn) & set(RETAIN)
    # The fake score and the generator see the drawn prompts at every pass; the teacher sees
    # each forget prompt's own override and every retained prompt unchanged.
    assert all(prompts_of(c) == drawn for c in seen["fake"] + seen["generator"])
    assert len(seen["teacher"]) == 1
    expected = [OVERRIDES[FORGET.index(p)] if p in FORGET else p for p in drawn]
    assert prompts_of(seen["teacher"][0]) == expected


def test_guidance_mixes_the_teachers_unconditional_and_conditional_predictions(
        sd_dir: Path) -> None:
    module = sfd(sd_dir, guidance_scale=3.0)
    teacher, embeddings = module.teacher, module.prompt_embeddings()
    x_t, t = torch.randn(2, 4, IMAGE_SIZE // 2, IMAGE_SIZE // 2), torch.tensor([100, 700])
    conditions = torch.tensor([0, 3])
    with torch.no_grad():
        guided = module.predict(teacher, x_t, t, conditions, teacher=True)
        conditional = teacher(x_t, t, encoder_hidden_states=embeddings[conditions]).sample
        unconditional = teacher(x_t, t, encoder_hidden_states=embeddings[[-1, -1]]).sample
        plain = module.predict(module.fake_score, x_t, t, conditions)
    torch.testing.assert_close(guided, unconditional + 3.0 * (conditional - unconditional))
    torch.testing.assert_close(plain, conditional)  # only the teacher is guided
    assert module.prompts[-1] == ""


def test_the_export_round_trips_to_the_same_one_step_images(sd_dir: Path,
                                                            tmp_path: Path) -> None:
    module = sfd(sd_dir)
    fit(module, 2)
    module.save_pretrained(tmp_path / "generator")
    assert "OneStepTextToImagePipeline" in (tmp_path / "generator" / "README.md").read_text()
    loaded = OneStepTextToImagePipeline.from_pretrained(tmp_path / "generator")
    assert loaded.config.t_init == 625
    prompts = ["a red car", "a painting by jane doe"]
    images = loaded(prompts, generator=torch.Generator().manual_seed(0), output_type="pt").images
    expected = module.pipeline()(prompts, generator=torch.Generator().manual_seed(0),
                                 output_type="pt").images
    assert images.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    torch.testing.assert_close(images, expected, rtol=0, atol=0)
    # The pipeline's image is the VAE's decoding of the EMA generator's one-step latents.
    z = torch.randn(2, 4, IMAGE_SIZE // 2, IMAGE_SIZE // 2,
                    generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        latents = module.generate(z, torch.tensor([2, 0]), ema=True)
        vae = module.frozen.get("vae")
        decoded = vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)
    torch.testing.assert_close(images, decoded, rtol=0, atol=1e-6)
    pictures = loaded(prompts).images
    assert [p.size for p in pictures] == [(IMAGE_SIZE, IMAGE_SIZE)] * 2


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(sd_dir: Path,
                                                            tmp_path: Path) -> None:
    def run(steps: int, root: Path, ckpt_path: str | None = None) -> TextToImageSFDModule:
        pl.seed_everything(0)
        module = sfd(sd_dir)
        pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, default_root_dir=root,
                   enable_progress_bar=False, enable_model_summary=False,
                   callbacks=[ModelCheckpoint(dirpath=root, save_last=True)]
                   ).fit(module, ckpt_path=ckpt_path)
        return module

    whole = run(8, tmp_path / "whole")
    run(4, tmp_path / "part")
    resumed = run(8, tmp_path / "part", ckpt_path=str(tmp_path / "part" / "last.ckpt"))
    assert resumed.iteration == 4
    for name, tensor in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], tensor, rtol=0, atol=0)


def test_bad_prompts_and_a_v_prediction_teacher_are_named(sd_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="forget_prompts must be one or more non-empty"):
        sfd(sd_dir, forget_prompts=[])
    with pytest.raises(ValueError, match="one per forget prompt \\(2\\), got 3"):
        sfd(sd_dir, override_prompts=["a", "b", "c"])
    with pytest.raises(ValueError, match="cannot also be retained or an override"):
        sfd(sd_dir, retain_prompts=["a red car", FORGET[0]])
    with pytest.raises(ValueError, match="guidance_scale must be >= 1"):
        sfd(sd_dir, guidance_scale=0.5)
    one = sfd(sd_dir, override_prompts="a painting")  # one override for every forget prompt
    assert one.prompts[len(FORGET) + len(RETAIN):] == ["a painting", "a painting", ""]
    pipeline = tiny_sd_pipeline(tmp_path / "tokenizer")
    pipeline.scheduler.register_to_config(prediction_type="v_prediction")
    pipeline.save_pretrained(tmp_path / "sd2")
    with pytest.raises(ValueError, match="needs an epsilon-predicting teacher"):
        sfd(tmp_path / "sd2")


def test_the_shipped_config_distils_and_exports_through_the_cli(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    save_tiny_sd(tmp_path / "models/stable-diffusion-v1-4")
    main(["fit", "--config", str(CONFIGS / "sd" / "sfd.yaml"), "--trainer.accelerator=cpu",
          "--trainer.max_steps=4", "--model.init_args.batch_size=2",
          "--model.init_args.gradient_checkpointing=false"])
    exported = OneStepTextToImagePipeline.from_pretrained(tmp_path / "runs/sd/sfd_generator")
    images = exported(["a red car on a street"], output_type="pt").images
    assert images.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE) and torch.isfinite(images).all()
    assert (tmp_path / "runs/sd/sfd/checkpoints/last.ckpt").is_file()
