"""SFDModule on a tiny label-conditional UNet: what moves, which network sees which label."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from vdu_lightning import ClassifierModule, DiffusionModule
from vdu_lightning.methods.sfd.module import SFDModule
from vdu_lightning.methods.sfd import OneStepGeneratorPipeline


@pytest.fixture
def teacher(tmp_path: Path, tiny_unet_config: dict) -> Path:
    torch.manual_seed(0)
    module = DiffusionModule(unet=tiny_unet_config, num_classes=10, num_train_timesteps=100)
    module.save_pretrained(tmp_path / "teacher")
    return tmp_path / "teacher"


def sfd(teacher: Path, **kwargs) -> SFDModule:
    kwargs = {"forget_classes": [3], "t_min": 5, "t_max": 80, "t_init": 50, "lr": 1e-3,
              "batch_size": 20, "steps_per_epoch": 3, **kwargs}
    return SFDModule(str(teacher), **kwargs)


def test_a_few_steps_move_generator_and_fake_score_but_not_the_teacher(teacher: Path) -> None:
    module = sfd(teacher)
    before = {name: {n: p.detach().clone() for n, p in net.named_parameters()}
              for name, net in (("generator", module.generator), ("fake", module.fake_score),
                                ("teacher", module.teacher))}
    pl.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False).fit(module)
    for name, net in (("generator", module.generator), ("fake", module.fake_score),
                      ("teacher", module.teacher)):
        moved = any(not torch.equal(p, before[name][n]) for n, p in net.named_parameters())
        assert moved == (name != "teacher"), name
    # The teacher is not checkpointed; the EMA generator is.
    assert {key.split(".")[0] for key in module.state_dict()} == {
        "generator", "fake_score", "ema_generator"}


def test_forgotten_labels_meet_their_override_in_the_teacher_only(teacher: Path,
                                                                  tmp_path: Path) -> None:
    rng = torch.Generator().manual_seed(0)
    module = sfd(teacher, override="fixed", override_class=7, batch_size=200)
    labels, forget = module.draw_conditions(rng)
    assert forget.any() and (~forget).any()
    assert torch.equal(forget, labels == 3)
    samples = torch.zeros(200, 1, 8, 8)
    teacher_labels = module.teacher_conditions(labels, forget, samples, rng)
    assert (teacher_labels[forget] == 7).all()
    assert torch.equal(teacher_labels[~forget], labels[~forget])
    random = sfd(teacher, override="random", batch_size=200)
    teacher_labels = random.teacher_conditions(labels, forget, samples, rng)
    assert not (teacher_labels[forget] == 3).any() and teacher_labels[forget].unique().numel() > 1


def test_the_classifier_override_is_the_likeliest_retained_label(teacher: Path,
                                                                 tmp_path: Path) -> None:
    torch.manual_seed(0)
    ClassifierModule(in_channels=1, num_classes=10, width=8).save_pretrained(tmp_path / "cls")
    module = sfd(teacher, override="classifier", classifier=str(tmp_path / "cls"))
    classifier = ClassifierModule.from_pretrained(tmp_path / "cls")
    samples = torch.rand(40, 1, 8, 8) * 2 - 1
    labels = torch.tensor([3, 5] * 20)
    forget = labels == 3
    teacher_labels = module.teacher_conditions(labels, forget, samples, None)
    with torch.no_grad():
        logits = classifier(samples)
    logits[:, 3] = -float("inf")  # the forgotten label is never an override
    assert torch.equal(teacher_labels[forget], logits.argmax(1)[forget])
    assert (teacher_labels[~forget] == 5).all()
    with pytest.raises(ValueError, match="exactly when override='classifier'"):
        sfd(teacher, override="classifier")
    ClassifierModule(in_channels=1, num_classes=4, width=8).save_pretrained(tmp_path / "four")
    mismatched = sfd(teacher, override="classifier", classifier=str(tmp_path / "four"))
    mismatched.trainer = pl.Trainer(accelerator="cpu", logger=False)
    with pytest.raises(ValueError, match="tells 4 classes apart; the teacher has 10 labels"):
        mismatched.setup("fit")  # before any step


def test_in_a_step_only_the_teacher_sees_the_override(teacher: Path) -> None:
    module = sfd(teacher, override="fixed", override_class=7, batch_size=60)
    seen: dict[str, list[torch.Tensor]] = {"generator": [], "fake": [], "teacher": []}
    for name, net in (("generator", module.generator), ("fake", module.fake_score),
                      ("teacher", module.teacher)):
        net.register_forward_pre_hook(
            lambda _, args, kwargs, name=name: seen[name].append(kwargs["class_labels"].clone()),
            with_kwargs=True)
    pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False).fit(module)
    labels = seen["generator"][0]
    assert (labels == 3).any()
    # Fake-score step: the generator's and the fake score's passes; generator step: the
    # generator's (fresh noise, same labels), the teacher's and the fake score's.
    assert len(seen["generator"]) == 2 and len(seen["fake"]) == 2
    assert all(torch.equal(c, labels) for c in seen["fake"] + seen["generator"])
    assert len(seen["teacher"]) == 1
    assert torch.equal(seen["teacher"][0], torch.where(labels == 3, 7, labels))


def test_each_group_counts_as_its_own_batch_and_the_forget_weight_warms_up(
        teacher: Path) -> None:
    module = sfd(teacher, forget_warmup_steps=10, forget_weight=0.5, retain_weight=2.0)
    forget = torch.tensor([True, False, False, False])
    losses = torch.tensor([4.0, 1.0, 2.0, 3.0])
    assert float((module.term_weights(forget) * losses).mean()) == pytest.approx(2.0 * 2.0)
    pl.Trainer(accelerator="cpu", max_steps=10, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False).fit(module)
    assert module.iteration == 5  # two optimizer steps per iteration
    # a_f·mean(forgotten) + a_r·mean(retained), a_f half warmed up.
    assert float((module.term_weights(forget) * losses).mean()) == pytest.approx(
        0.25 * 4.0 + 2.0 * 2.0)
    assert module.term_weights(torch.tensor([False, False])).tolist() == [2.0, 2.0]


def test_without_forget_classes_it_is_plain_sid(teacher: Path) -> None:
    module = sfd(teacher, forget_classes=[], batch_size=50)
    labels, forget = module.draw_conditions(torch.Generator().manual_seed(0))
    assert labels.unique().numel() == 10 and not forget.any()
    assert torch.equal(module.teacher_conditions(labels, forget, torch.zeros(50, 1, 8, 8), None),
                       labels)
    assert (module.term_weights(forget) == 1.0).all()


def test_bad_arguments_are_named(teacher: Path, tmp_path: Path, tiny_unet_config: dict) -> None:
    with pytest.raises(ValueError, match="forget_classes must be labels in 0..9"):
        sfd(teacher, forget_classes=[12])
    with pytest.raises(ValueError, match="not all of them"):
        sfd(teacher, forget_classes=list(range(10)))
    with pytest.raises(ValueError, match="override_class among the retained labels"):
        sfd(teacher, override="fixed", override_class=3)
    DiffusionModule(unet=tiny_unet_config).save_pretrained(tmp_path / "unconditional")
    with pytest.raises(ValueError, match="needs a label-conditional teacher"):
        sfd(tmp_path / "unconditional")


def test_export_and_reload_give_the_same_one_step_samples(teacher: Path, tmp_path: Path) -> None:
    module = sfd(teacher)
    pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False).fit(module)
    module.save_pretrained(tmp_path / "generator")
    loaded = OneStepGeneratorPipeline.from_pretrained(tmp_path / "generator")
    assert loaded.config.t_init == 50
    labels = [0, 3, 9]
    images = loaded(labels, generator=torch.Generator().manual_seed(0), output_type="pt").images
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = module.generate(z, torch.tensor(labels), ema=True).clamp(-1, 1)
    assert images.shape == (3, 1, 8, 8)
    torch.testing.assert_close(images, expected.detach(), rtol=0, atol=0)
    again = OneStepGeneratorPipeline.from_pretrained(tmp_path / "generator")
    pictures = again(labels, generator=torch.Generator().manual_seed(0)).images
    assert [p.size for p in pictures] == [(8, 8)] * 3
    pixels = torch.tensor(np.stack([np.asarray(p) for p in pictures])).float()
    torch.testing.assert_close(pixels, ((images[:, 0] + 1) / 2 * 255).round(), rtol=0, atol=1)
    with pytest.raises(ValueError, match=r"labels in 0..9, got \[10\]"):
        again([10])


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(teacher: Path, tmp_path: Path) -> None:
    def fit(steps: int, root: Path, ckpt_path: str | None = None) -> SFDModule:
        pl.seed_everything(0)
        module = sfd(teacher)
        pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, default_root_dir=root,
                   enable_progress_bar=False, enable_model_summary=False,
                   callbacks=[ModelCheckpoint(dirpath=root, save_last=True)]
                   ).fit(module, ckpt_path=ckpt_path)
        return module

    whole = fit(8, tmp_path / "whole")
    fit(4, tmp_path / "part")
    resumed = fit(8, tmp_path / "part", ckpt_path=str(tmp_path / "part" / "last.ckpt"))
    assert resumed.iteration == 4
    for name, tensor in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], tensor, rtol=0, atol=0)


@pytest.mark.parametrize("trainer_args, message", [
    ({"devices": 2, "strategy": "ddp_spawn"}, "needs find_unused_parameters=True"),
    ({"precision": "bf16-true"}, "does not run with precision='bf16-true'"),
])
def test_ddp_without_unused_parameters_and_16_bit_weights_are_refused_at_setup(
        teacher: Path, trainer_args: dict, message: str) -> None:
    module = sfd(teacher)
    module.trainer = pl.Trainer(accelerator="cpu", logger=False, **trainer_args)
    with pytest.raises((NotImplementedError, ValueError), match=message):
        module.setup("fit")
