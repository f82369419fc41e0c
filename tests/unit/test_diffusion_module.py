"""DiffusionModule: sampling, EMA, conditioning and the diffusers directory round trip."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMPipeline, DDPMPipeline

from vdu_lightning import DiffusionModule
from vdu_lightning.diffusion import ddim_sample, seeded_noise


def _perturb(module: torch.nn.Module, seed: int) -> None:
    """Move every parameter away from its initial value (zero-initialised layers included)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))


def test_ddim_sampler_matches_diffusers_ddim_pipeline(tiny_unet_config: dict) -> None:
    module = DiffusionModule(unet=tiny_unet_config, num_train_timesteps=100)
    _perturb(module.unet, seed=1)
    unet = module.unet.eval()
    ours = ddim_sample(unet, module.scheduler.config, seeded_noise(3, (1, 8, 8), seed=7),
                       num_steps=5)
    pipe = DDIMPipeline(unet=unet, scheduler=module.scheduler)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(batch_size=3, generator=torch.Generator().manual_seed(7), eta=0.0,
                  num_inference_steps=5, output_type="np").images
    theirs = torch.from_numpy(theirs).permute(0, 3, 1, 2)
    torch.testing.assert_close((ours + 1) / 2, theirs, atol=1e-5, rtol=1e-5)


def test_same_seed_same_samples_other_seed_other_samples(tiny_unet_config: dict) -> None:
    module = DiffusionModule(unet=tiny_unet_config, num_train_timesteps=100, sample_steps=3)
    _perturb(module.ema_unet, seed=2)
    a, b = module.sample(4, seed=3), module.sample(4, seed=3)
    c = module.sample(4, seed=4)
    assert a.shape == (4, 1, 8, 8) and a.min() >= -1 and a.max() <= 1
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.allclose(a, c)
    # Batching must not change which image a seed gives.
    torch.testing.assert_close(module.sample(4, seed=3, batch_size=3), a)


def test_ema_update_follows_the_ramped_decay(tiny_unet_config: dict) -> None:
    module = DiffusionModule(unet=tiny_unet_config, ema_decay=0.99)
    with torch.no_grad():
        for ema, p in zip(module.ema_unet.parameters(), module.unet.parameters()):
            ema.fill_(0.0)
            p.fill_(1.0)
    module.update_ema()  # global_step 0: decay = min(0.99, 1/10) = 0.1
    for ema in module.ema_unet.parameters():
        torch.testing.assert_close(ema, torch.full_like(ema, 0.9))
    assert not any(p.requires_grad for p in module.ema_unet.parameters())


def test_save_pretrained_round_trip_gives_identical_outputs(tmp_path, tiny_unet_config) -> None:
    module = DiffusionModule(unet=tiny_unet_config, num_train_timesteps=100, sample_steps=3)
    _perturb(module.unet, seed=3)
    _perturb(module.ema_unet, seed=4)
    module.save_pretrained(tmp_path / "model")
    assert (tmp_path / "model" / "model_index.json").is_file()

    loaded = DiffusionModule.from_pretrained(tmp_path / "model", sample_steps=3)
    x = torch.randn(2, 1, 8, 8)
    t = torch.tensor([5, 50])
    with torch.no_grad():
        expected = module.ema_unet.eval()(x, t).sample  # the EMA weights are exported
        torch.testing.assert_close(loaded.unet.eval()(x, t).sample, expected, atol=0, rtol=0)
    torch.testing.assert_close(loaded.sample(2, seed=5), module.sample(2, seed=5),
                               atol=0, rtol=0)
    assert loaded.scheduler.config.num_train_timesteps == 100

    # Plain diffusers loads it too.
    pipeline = DDPMPipeline.from_pretrained(tmp_path / "model", local_files_only=True)
    with torch.no_grad():
        torch.testing.assert_close(pipeline.unet(x, t).sample, expected, atol=0, rtol=0)


def test_failed_export_keeps_the_previous_model(tmp_path, tiny_unet_config, monkeypatch) -> None:
    module = DiffusionModule(unet=tiny_unet_config)
    module.save_pretrained(tmp_path / "model")
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "model").rglob("*"))

    def broken_save(self, directory, **kwargs):
        (directory / "half_written").write_text("x")
        raise OSError("disk full")

    monkeypatch.setattr(DDPMPipeline, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        module.save_pretrained(tmp_path / "model")
    after = sorted(p.relative_to(tmp_path) for p in (tmp_path / "model").rglob("*"))
    assert after == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary left behind


def test_conditional_model_has_a_null_label_and_guidance(tiny_unet_config: dict) -> None:
    module = DiffusionModule(unet=tiny_unet_config, num_classes=3, label_dropout=0.5,
                             num_train_timesteps=100, sample_steps=2)
    assert module.unet.config.num_class_embeds == 4 and module.null_label == 3
    _perturb(module.ema_unet, seed=5)
    labels = torch.tensor([0, 1, 2, 0])
    plain = module.sample(4, seed=1, labels=labels, guidance_scale=1.0)
    guided = module.sample(4, seed=1, labels=labels, guidance_scale=3.0)
    other = module.sample(4, seed=1, labels=torch.tensor([1, 2, 0, 1]), guidance_scale=1.0)
    assert not torch.allclose(plain, guided)
    assert not torch.allclose(plain, other)

    module.noise.generator = torch.Generator().manual_seed(0)
    batch = {"label": torch.zeros(4000, dtype=torch.long)}
    dropped = (module._labels(batch, drop=True) == module.null_label).float().mean()
    assert 0.45 < dropped < 0.55
    assert (module._labels(batch, drop=False) == 0).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of `unet`"),
        ({"unet": {"sample_size": 8, "bogus": 1}}, "invalid UNet2DModel configuration"),
        ({"unet": "tiny", "label_dropout": 1.0}, "label_dropout"),
        ({"pretrained": "/nonexistent/model"}, "pretrained model directory not found"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, message: str, tiny_unet_config: dict) -> None:
    if kwargs.get("unet") == "tiny":
        kwargs["unet"] = tiny_unet_config
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        DiffusionModule(**kwargs)


def test_conditional_mismatch_is_refused(tmp_path, tiny_unet_config) -> None:
    DiffusionModule(unet=tiny_unet_config, num_classes=3).save_pretrained(tmp_path / "cond")
    with pytest.raises(ValueError, match="label-conditional"):
        DiffusionModule.from_pretrained(tmp_path / "cond")
    with pytest.raises(ValueError, match="num_classes=5 needs a UNet with 6"):
        DiffusionModule.from_pretrained(tmp_path / "cond", num_classes=5)
