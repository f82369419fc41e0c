"""VDU's plasticity and step options: the centred residual, the hinge, the timestep band and
the prior preconditioner, each by its maths and by what it changes in a real run."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from test_vdu_module import forget_data, make_prior
from vdu_lightning import ParameterPrior, TextToImageVDUModule, VDUModule
from vdu_lightning.methods.vdu.objective import hinged_error, per_example_error


def _images(count: int = 8) -> dict[str, torch.Tensor]:
    data = forget_data()
    data.setup("fit")
    return {"image": torch.stack([data.forget_set[i]["image"] for i in range(count)])}


def _seeded(module: VDUModule, seed: int = 0) -> VDUModule:
    module.noise.generator = torch.Generator().manual_seed(seed)
    return module


def _grads(module: VDUModule) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.unet.named_parameters() if p.grad is not None}


# ---- the maths ------------------------------------------------------------------------------
def test_centred_error_ignores_a_shift_of_the_whole_image_but_not_its_content() -> None:
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(4, 2, 6, 6, generator=generator)
    predicted = noise + 0.1 * torch.randn(4, 2, 6, 6, generator=generator)
    shift = torch.tensor([0.5, -2.0]).view(1, 2, 1, 1)  # one value per channel
    centred = per_example_error(predicted, noise, centred=True)
    assert torch.allclose(per_example_error(predicted + shift, noise, centred=True), centred,
                          atol=1e-6)
    plain = per_example_error(predicted, noise)
    assert (per_example_error(predicted + shift, noise) > plain + 1.0).all()
    blob = torch.zeros_like(noise)
    blob[..., 2:4, 2:4] = 1.0
    assert (per_example_error(predicted + blob, noise, centred=True) > centred + 0.05).all()
    # by hand: 'sum' is the pixel count times 'mean'
    assert torch.allclose(per_example_error(predicted, noise, True, "sum"), centred * 72)


def test_hinged_error_stops_counting_and_pushing_at_k_times_the_reference() -> None:
    errors = torch.tensor([1.0, 3.0, 10.0], requires_grad=True)
    hinged = hinged_error(errors, torch.tensor([1.0, 1.0, 1.0]), 2.5)
    assert hinged.tolist() == [1.0, 2.5, 2.5]
    hinged.sum().backward()
    assert errors.grad.tolist() == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="> 1"):
        hinged_error(errors, errors, 1.0)


# ---- in the module --------------------------------------------------------------------------
def test_the_default_plasticity_is_the_methods_and_each_option_changes_it(
    pretrained: Path,
) -> None:
    batch = _images()
    plain = _seeded(VDUModule(str(pretrained))).plasticity_loss(batch)
    # by hand, with the same draws as the module's noising
    generator = torch.Generator().manual_seed(0)
    module = VDUModule(str(pretrained))
    t = torch.randint(0, 100, (8,), generator=generator)
    noise = torch.randn(batch["image"].shape, generator=generator)
    with torch.no_grad():
        x_t = module.scheduler.add_noise(batch["image"], noise, t)
        residual = noise - module.unet(x_t, t).sample
    assert torch.isclose(plain, -residual.square().mean(), rtol=1e-5)
    centred = _seeded(VDUModule(str(pretrained), residual="centred")).plasticity_loss(batch)
    by_hand = -(residual - residual.mean((2, 3), keepdim=True)).square().mean()
    assert torch.isclose(centred, by_hand, rtol=1e-5)
    assert not torch.isclose(centred, plain, rtol=1e-3)


def test_forget_timesteps_draw_t_from_the_band_only(pretrained: Path) -> None:
    module = VDUModule(str(pretrained), forget_timesteps=(40, 60))
    # C_t is NaN outside the band: the term is finite only if every t falls inside it.
    module.weight_per_timestep[:40] = float("nan")
    module.weight_per_timestep[60:] = float("nan")
    for seed in range(5):
        assert torch.isfinite(_seeded(module, seed).plasticity_loss(_images(16)))
    module.forget_timesteps = None  # the whole range: now some t fall outside
    assert not torch.isfinite(_seeded(module).plasticity_loss(_images(16)))


def test_the_hinge_matches_the_plain_term_at_the_start_and_stops_pushing_beyond_k(
    pretrained: Path,
) -> None:
    batch = _images()
    hinged = VDUModule(str(pretrained), hinge_factor=1.5)
    plain = VDUModule(str(pretrained))
    # At θ = θ* the error is the original's, below 1.5 times it: the plain gradient.
    for module in (hinged, plain):
        _seeded(module).plasticity_loss(batch).backward()
    for name, grad in _grads(plain).items():
        assert torch.allclose(_grads(hinged)[name], grad, atol=1e-6), name
    # Far from θ* every example's error exceeds 1.5 times the original's: nothing pushes.
    for module in (hinged, plain):
        module.unet.zero_grad()
        with torch.no_grad():
            module.unet.conv_out.bias.add_(3.0)
        loss = _seeded(module).plasticity_loss(batch)
        loss.backward()
    assert all(not g.any() for g in _grads(hinged).values())
    assert any(g.any() for g in _grads(plain).values())


def test_the_prior_preconditioner_scales_each_step_by_the_prior_variance(
    tmp_path: Path, pretrained: Path
) -> None:
    def one_step(preconditioner: str, prior: ParameterPrior) -> dict[str, torch.Tensor]:
        pl.seed_everything(0)
        module = VDUModule(str(pretrained), gamma=0.5, optimizer="sgd", lr=1e-2,
                           preconditioner=preconditioner)
        start = {n: p.detach().clone() for n, p in module.unet.named_parameters()}
        module.set_prior(prior)
        pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False,
                   limit_val_batches=0, default_root_dir=tmp_path).fit(
            module, datamodule=forget_data())
        return {n: (p.detach() - start[n], start[n]) for n, p in module.unet.named_parameters()}

    module = VDUModule(str(pretrained))
    prior = make_prior(module.unet)
    plain, scaled = one_step("none", prior), one_step("prior", prior)
    mean_var = sum(float(v.sum()) for v in prior.var.values()) / prior.numel
    for name, (step, start) in plain.items():
        expected = step * prior.var[name] / mean_var
        # θ + Δ − θ in float32 is Δ only up to the rounding of θ: a few eps · |θ|
        rounding = 4 * torch.finfo(torch.float32).eps * float(start.abs().max())
        assert torch.allclose(scaled[name][0], expected, rtol=1e-4, atol=rounding), name
    assert not all(torch.allclose(scaled[n][0], plain[n][0]) for n in plain)


@pytest.mark.parametrize("kwargs, message", [
    ({"residual": "median"}, "residual must be one of"),
    ({"hinge_factor": 1.0}, "hinge_factor must be > 1"),
    ({"forget_timesteps": (50, 50)}, "forget_timesteps must be"),
    ({"forget_timesteps": (0, 101)}, "forget_timesteps must be"),
    ({"preconditioner": "fisher"}, "preconditioner must be one of"),
    ({"preconditioner": "prior"}, "needs optimizer='sgd'"),
])
def test_bad_options_are_refused_naming_them(pretrained: Path, kwargs: dict,
                                             message: str) -> None:
    with pytest.raises(ValueError, match=message):
        VDUModule(str(pretrained), **kwargs)


def test_text_to_image_vdu_refuses_the_pixel_space_plasticity_options(tmp_path: Path) -> None:
    # Refused before the pipeline is read: the folder need not exist.
    with pytest.raises(ValueError, match="hinge_factor"):
        TextToImageVDUModule(str(tmp_path / "not_read"), hinge_factor=2.0)
