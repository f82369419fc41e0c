"""The peer methods (docs/method.md §7) on a tiny DDPM: what each minimises and what it moves."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from diffusers import UNet2DModel

from vdu_lightning import (
    ClassifierModule,
    DiffusionModule,
    EWCModule,
    ForgetSetDataModule,
    GradientAscentModule,
    IsotropicAnchorModule,
    RetainFinetuneModule,
    SalUnModule,
)
from vdu_lightning.diffusion import predict_noise
from vdu_lightning.methods.peers.fisher import diagonal_fisher, fisher_timesteps
from vdu_lightning.methods.peers.salun import saliency_mask


def forget_data(**kwargs) -> ForgetSetDataModule:
    kwargs = {"dataset": "digits", "forget_classes": [3], "forget_size": 48, "eval_size": 16,
              "batch_size": 16, **kwargs}
    return ForgetSetDataModule(**kwargs)


def fit(tmp_path: Path, module: pl.LightningModule, data: ForgetSetDataModule,
        steps: int = 3) -> dict[str, torch.Tensor]:
    """Fit for ``steps`` and return the weights before fit."""
    before = {n: p.detach().clone() for n, p in module.unet.named_parameters()}
    pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
               default_root_dir=tmp_path).fit(module, datamodule=data)
    return before


def moved(module: pl.LightningModule, before: dict[str, torch.Tensor]) -> dict[str, bool]:
    return {n: not torch.equal(p.detach(), before[n]) for n, p in module.unet.named_parameters()}


def test_gradient_ascent_raises_the_forget_error_and_moves_every_weight(
        tmp_path: Path, pretrained: Path) -> None:
    module = GradientAscentModule(str(pretrained), lr=1e-2)
    before = fit(tmp_path, module, forget_data())
    assert all(moved(module, before).values())
    terms = module.loss_terms
    assert terms["loss"] == terms["plasticity"] < 0
    assert module.data_constrained


def test_the_isotropic_anchor_holds_theta_star_with_one_variance(
        tmp_path: Path, pretrained: Path) -> None:
    module = IsotropicAnchorModule(str(pretrained), gamma=0.5, variance=1e-3, lr=1e-2)
    theta_star = {n: p.detach().clone() for n, p in module.unet.named_parameters()}
    fit(tmp_path, module, forget_data())
    prior = module.prior
    assert prior.source == "isotropic"
    assert all(torch.equal(prior.mean[n], theta_star[n]) for n in theta_star)
    assert all(bool((v == 1e-3).all()) for v in prior.var.values())
    # S is (θ − θ*)² / (2σ²), averaged over entries.
    expected = torch.cat([((p.detach() - theta_star[n]) ** 2).flatten()
                          for n, p in module.unet.named_parameters()]).mean() / (2 * 1e-3)
    torch.testing.assert_close(module.stability_loss().detach(), expected)
    assert float(expected) > 0
    with pytest.raises(ValueError, match="variance must be positive"):
        IsotropicAnchorModule(str(pretrained), variance=0.0)


def test_salun_moves_only_the_salient_half(tmp_path: Path, pretrained: Path) -> None:
    module = SalUnModule(str(pretrained), saliency=0.5, retain_weight=0.0, lr=1e-2)
    assert module.data_constrained
    before = fit(tmp_path, module, forget_data())
    entries = sum(m.numel() for m in module.mask.values())
    salient = sum(int(m.sum()) for m in module.mask.values())
    assert abs(salient - entries / 2) <= 0.01 * entries
    changed_outside = changed_inside = 0
    for name, parameter in module.unet.named_parameters():
        delta = parameter.detach() != before[name]
        changed_outside += int((delta & ~module.mask[name]).sum())
        changed_inside += int((delta & module.mask[name]).sum())
    assert changed_outside == 0
    assert changed_inside > 0.5 * salient


def test_salun_and_retain_finetuning_need_retain_data_and_say_so(tmp_path: Path,
                                                                 pretrained: Path) -> None:
    for module in (SalUnModule(str(pretrained), retain_weight=1e-3),
                   RetainFinetuneModule(str(pretrained))):
        assert not module.data_constrained
        with pytest.raises(ValueError, match="give ForgetSetDataModule a retain_size > 0"):
            fit(tmp_path, module, forget_data())


def test_retain_finetuning_trains_on_the_retain_batch(tmp_path: Path, pretrained: Path) -> None:
    module = RetainFinetuneModule(str(pretrained), lr=1e-2)
    before = fit(tmp_path, module, forget_data(retain_size=32))
    assert any(moved(module, before).values())
    assert set(module.loss_terms) == {"retain", "loss"}
    assert module.loss_terms["retain"] > 0


def test_the_fisher_is_the_mean_squared_gradient_of_each_sample_summed_over_t() -> None:
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8),
                       norm_num_groups=4, layers_per_block=1,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    from diffusers import DDPMScheduler
    scheduler = DDPMScheduler(num_train_timesteps=10)
    images = torch.rand(3, 1, 8, 8) * 2 - 1
    fisher = diagonal_fisher(unet, scheduler, images, num_timesteps=5, batch_size=2,
                             generator=torch.Generator().manual_seed(7))

    # By hand: the same noise draws, one image at a time, all 5 timesteps in one pass.
    generator = torch.Generator().manual_seed(7)
    t = fisher_timesteps(10, 5)
    expected = {n: torch.zeros_like(p) for n, p in unet.named_parameters()}
    unet.eval()
    for image in images:
        noise = torch.cat([torch.randn(len(chunk), 1, 8, 8, generator=generator)
                           for chunk in t.split(2)])
        x_t = scheduler.add_noise(image.expand(5, 1, 8, 8), noise, t)
        loss = 2.0 * ((predict_noise(unet, x_t, t) - noise) ** 2).sum()  # Σ_t ‖·‖²
        unet.zero_grad()
        loss.backward()
        for n, p in unet.named_parameters():
            expected[n] += p.grad ** 2 / len(images)
    for name in expected:
        torch.testing.assert_close(fisher[name], expected[name], rtol=1e-4, atol=1e-10)
    assert sum(float(f.sum()) for f in fisher.values()) > 0


def test_ewc_penalty_is_lambda_fisher_weighted_and_the_fisher_file_is_reused(
        tmp_path: Path, pretrained: Path) -> None:
    path = tmp_path / "fisher.safetensors"
    module = EWCModule(str(pretrained), ewc_weight=3.0, fisher_samples=2, fisher_timesteps=4,
                       fisher_path=str(path), sample_steps=2, lr=1e-2)
    before = fit(tmp_path, module, forget_data())
    assert path.is_file() and module.prior.source == "fisher"
    assert any(moved(module, before).values())
    fisher = {n: 0.5 / v for n, v in module.prior.var.items()}
    expected = 3.0 * sum(float((fisher[n] * (p.detach() - before[n]) ** 2).sum())
                         for n, p in module.unet.named_parameters())
    pixels = 1 * 8 * 8  # reduction="mean": the penalty of per-image sums ÷ D
    assert float(module.stability_loss().detach()) == pytest.approx(expected / pixels, rel=1e-4)
    assert set(module.loss_terms) == {"plasticity", "ewc", "loss"}

    again = EWCModule(str(pretrained), fisher_samples=2, fisher_timesteps=4,
                      fisher_path=str(path), sample_steps=2)
    fit(tmp_path, again, forget_data(), steps=1)
    assert all(torch.equal(again.prior.var[n], module.prior.var[n]) for n in fisher)

    # The cached Fisher belongs to the pre-trained weights: the unlearned model's is refused.
    module.save_pretrained(tmp_path / "moved")
    other = EWCModule(str(tmp_path / "moved"), fisher_samples=2, fisher_timesteps=4,
                      fisher_path=str(path), sample_steps=2)
    with pytest.raises(ValueError, match="about other weights, not the Fisher of this model"):
        fit(tmp_path, other, forget_data(), steps=1)


def test_every_peer_rebuilds_from_its_hyperparameters(pretrained: Path) -> None:
    """What load_from_checkpoint does: cls(**hparams)."""
    for cls, kwargs in ((GradientAscentModule, {}), (IsotropicAnchorModule, {"gamma": 0.8}),
                        (EWCModule, {"ewc_weight": 2.0}), (SalUnModule, {"saliency": 0.3}),
                        (RetainFinetuneModule, {})):
        module = cls(str(pretrained), lr=1e-3, **kwargs)
        rebuilt = cls(**module.hparams)
        assert dict(rebuilt.hparams) == dict(module.hparams)
        assert "gamma" not in EWCModule(str(pretrained)).hparams


def test_ewc_without_a_prior_says_what_to_add(pretrained: Path) -> None:
    with pytest.raises(RuntimeError, match="EWCModule has no prior"):
        EWCModule(str(pretrained)).stability_loss()


def test_saliency_ties_do_not_let_more_weights_move(pretrained: Path) -> None:
    mask = saliency_mask({"a": torch.zeros(10), "b": torch.tensor([0.0, 1.0])}, 0.5)
    assert int(mask["a"].sum() + mask["b"].sum()) == 6 and bool(mask["b"][1])
    with pytest.raises(ValueError, match="needs weight_decay=0"):
        SalUnModule(str(pretrained), weight_decay=1e-2)


def test_ewc_replays_generated_samples_the_classifier_keeps(tmp_path: Path,
                                                            pretrained: Path) -> None:
    ClassifierModule(in_channels=1, num_classes=10).save_pretrained(tmp_path / "classifier")
    module = EWCModule(str(pretrained), fisher_samples=1, fisher_timesteps=2, sample_steps=2,
                       replay_samples=12, replay_classifier=str(tmp_path / "classifier"))
    fit(tmp_path, module, forget_data(), steps=2)
    assert module.replay is not None and 0 < len(module.replay["image"]) <= 12
    assert not torch.isin(module.replay["label"], torch.tensor([3])).any()
    assert module.loss_terms["replay"] > 0


def test_ewc_refuses_what_an_unconditional_model_cannot_do(pretrained: Path) -> None:
    with pytest.raises(ValueError, match="needs a label-conditional model"):
        EWCModule(str(pretrained), forget_objective="surrogate")
    with pytest.raises(ValueError, match="needs replay_classifier"):
        EWCModule(str(pretrained), replay_samples=10)


def test_conditional_peers_use_labels(tmp_path: Path, tiny_unet_config: dict) -> None:
    """SalUn's random-label loss and SA's surrogate on a label-conditional model."""
    torch.manual_seed(0)
    DiffusionModule(unet=tiny_unet_config, num_classes=10,
                    num_train_timesteps=100, sample_steps=2).save_pretrained(tmp_path / "cond")
    salun = SalUnModule(str(tmp_path / "cond"), retain_weight=0.0, lr=1e-2)
    before = fit(tmp_path, salun, forget_data())
    assert set(salun.loss_terms) == {"random_label", "loss"}
    assert salun.loss_terms["loss"] > 0 and any(moved(salun, before).values())
    sa = EWCModule(str(tmp_path / "cond"), forget_objective="surrogate", fisher_samples=1,
                   fisher_timesteps=2, sample_steps=2, lr=1e-2)
    fit(tmp_path, sa, forget_data(), steps=2)
    assert set(sa.loss_terms) == {"surrogate", "ewc", "loss"}
