"""PriorSnapshot and CheckpointPrior on a real tiny DiffusionModule and real Trainer runs."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from vdu_lightning import (
    ClassifierModule,
    DiffusionModule,
    ImageDataModule,
    ParameterPrior,
    VDUModule,
)
from vdu_lightning.callbacks import CheckpointPrior, PriorSnapshot
from vdu_lightning.files import load_checkpoint


class RecordWeights(pl.Callback):
    """Records the EMA (or raw) weights at given steps, as PriorSnapshot should see them."""

    def __init__(self, steps: set[int], attribute: str = "ema_unet") -> None:
        self.steps, self.attribute, self.records = steps, attribute, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step in self.steps and trainer.global_step not in self.records:
            network = getattr(pl_module, self.attribute)
            self.records[trainer.global_step] = {n: p.detach().clone()
                                                 for n, p in network.named_parameters()}


class StopAt(pl.Callback):
    """Ends a run early, as an interrupted job would (the checkpoint is taken at that step)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def fit(tmp_path: Path, module, callbacks, max_steps: int, ckpt_path=None, **kwargs
        ) -> pl.Trainer:
    kwargs = {"accelerator": "cpu", "logger": False, "enable_checkpointing": False,
              "enable_progress_bar": False, "enable_model_summary": False,
              "limit_val_batches": 0, "default_root_dir": tmp_path, **kwargs}
    trainer = pl.Trainer(max_steps=max_steps, callbacks=callbacks, **kwargs)
    trainer.fit(module, datamodule=ImageDataModule(dataset="digits", batch_size=16),
                ckpt_path=ckpt_path, weights_only=True)
    return trainer


def assert_prior_of(prior: ParameterPrior, snapshots: list[dict]) -> None:
    assert prior.count == len(snapshots)
    for name in prior.names:
        stacked = torch.stack([s[name].double() for s in snapshots])
        torch.testing.assert_close(prior.mean[name].double(), stacked.mean(0),
                                   rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(prior.var[name].double(),
                                   stacked.var(0).clamp_min(prior.min_var), rtol=1e-4, atol=1e-12)


def test_trajectory_snapshots_of_the_ema_weights_make_the_prior(
    tmp_path: Path, tiny_unet_config: dict
) -> None:
    module = DiffusionModule(unet=tiny_unet_config, num_train_timesteps=100, lr=1e-3)
    record = RecordWeights({3, 5, 7})
    snapshot = PriorSnapshot(str(tmp_path / "prior.safetensors"), every_n_steps=2, start_step=1)
    fit(tmp_path, module, [snapshot, record], max_steps=7)
    prior = ParameterPrior.load(tmp_path / "prior.safetensors")
    assert prior.source == "trajectory"
    assert_prior_of(prior, [record.records[s] for s in (3, 5, 7)])


def test_snapshot_state_survives_a_checkpoint_and_resume(tmp_path: Path,
                                                         tiny_unet_config: dict) -> None:
    path = str(tmp_path / "prior.safetensors")
    first = RecordWeights({2, 4, 6})
    module = DiffusionModule(unet=tiny_unet_config, num_train_timesteps=100, lr=1e-3)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=3)
    fit(tmp_path, module, [PriorSnapshot(path, every_n_steps=2), first, checkpoint,
                           StopAt(3)], max_steps=6, enable_checkpointing=True)
    saved = load_checkpoint(tmp_path / "ckpt" / "last.ckpt")  # plain tensors: weights_only
    assert saved["callbacks"][f"PriorSnapshot[{path}]"]["moments"]["count"] == 1

    second = RecordWeights({4, 6})
    resumed = DiffusionModule(unet=tiny_unet_config, num_train_timesteps=100, lr=1e-3)
    fit(tmp_path, resumed, [PriorSnapshot(path, every_n_steps=2), second], max_steps=6,
        ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    prior = ParameterPrior.load(path)
    assert_prior_of(prior, [first.records[2], second.records[4], second.records[6]])


def test_finetune_continuations_each_start_from_the_pretrained_weights(
    tmp_path: Path, tiny_unet_config: dict
) -> None:
    module = DiffusionModule(unet=tiny_unet_config, num_train_timesteps=100, lr=1e-2)
    start = {n: p.detach().clone() for n, p in module.unet.named_parameters()}
    # Recorded before PriorSnapshot resets the weights (callbacks run in list order).
    record = RecordWeights({2, 4, 6}, attribute="unet")

    class AfterReset(pl.Callback):
        adam_steps: list[int] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            state = trainer.optimizers[0].state
            first = next(iter(pl_module.unet.parameters()))
            self.adam_steps.append(int(state[first]["step"]) if first in state else 0)

    snapshot = PriorSnapshot(str(tmp_path / "prior.safetensors"), every_n_steps=2,
                             weights="raw", source="finetune")
    fit(tmp_path, module, [record, snapshot, AfterReset()], max_steps=6)
    prior = ParameterPrior.load(tmp_path / "prior.safetensors")
    assert prior.source == "finetune"
    snapshots = [record.records[s] for s in (2, 4, 6)]
    assert_prior_of(prior, snapshots)
    # Each continuation is 2 steps from the start: the optimizer starts afresh each time, and
    # the weights end where they started.
    assert AfterReset.adam_steps == [0, 1, 0, 1, 0, 1]
    for name, value in start.items():
        assert torch.equal(module.unet.get_parameter(name), value)
        assert torch.equal(module.ema_unet.get_parameter(name), value)
    assert not torch.equal(snapshots[0]["conv_in.weight"], snapshots[1]["conv_in.weight"])


def test_too_few_snapshots_are_refused_before_training(tmp_path: Path,
                                                       tiny_unet_config: dict) -> None:
    module = DiffusionModule(unet=tiny_unet_config)
    snapshot = PriorSnapshot(str(tmp_path / "p.safetensors"), every_n_steps=2, start_step=2)
    with pytest.raises(ValueError, match="would take 1 snapshots"):
        fit(tmp_path, module, [snapshot], max_steps=5)
    with pytest.raises(TypeError, match="ema_unet"):
        fit(tmp_path, ClassifierModule(), [snapshot], max_steps=5)


def test_checkpoint_prior_builds_from_checkpoints_like_the_library_and_can_save_it(
    tmp_path: Path, tiny_unet_config: dict
) -> None:
    paths = []
    for seed in range(3):
        torch.manual_seed(seed)
        DiffusionModule(unet=tiny_unet_config).save_pretrained(tmp_path / f"m{seed}")
        paths.append(str(tmp_path / f"m{seed}"))
    callback = CheckpointPrior(checkpoints=paths, source="independent", include=["down_*"],
                               save_to=str(tmp_path / "built.safetensors"))
    module = VDUModule(paths[0], lr=1e-3)
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, limit_val_batches=0,
                         enable_checkpointing=False, enable_progress_bar=False,
                         callbacks=[callback])
    trainer.fit(module, datamodule=ImageDataModule(dataset="digits", batch_size=8))
    expected = ParameterPrior.from_checkpoints(paths, "independent", include=["down_*"])
    saved = ParameterPrior.load(tmp_path / "built.safetensors")
    for prior in (module.prior, saved):
        assert prior.names == expected.names and prior.source == "independent"
        for name in expected.names:
            assert torch.equal(prior.var[name], expected.var[name])
    assert all(n.startswith("down_") for n in module.prior.names)


def module_and_prior_file(tmp_path: Path, unet: dict, offset: float = 0.0
                          ) -> tuple[VDUModule, dict[str, torch.Tensor], ParameterPrior]:
    """A VDU module, its starting weights, and a trajectory prior (saved as
    ``whole.safetensors``) of three snapshots around them, shifted by ``offset``."""
    torch.manual_seed(0)
    DiffusionModule(unet=unet).save_pretrained(tmp_path / "model")
    module = VDUModule(str(tmp_path / "model"), lr=1e-3)
    start = {n: p.detach().clone() for n, p in module.unet.named_parameters()}
    snapshots = [{n: p + offset + 1e-2 * torch.randn_like(p) for n, p in start.items()}
                 for _ in range(3)]
    whole = ParameterPrior.from_tensors(snapshots, "trajectory")
    whole.save(tmp_path / "whole.safetensors")
    return module, start, whole


def fit_with(module: VDUModule, callback: CheckpointPrior, steps: int) -> None:
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, limit_val_batches=0,
                         enable_checkpointing=False, enable_progress_bar=False,
                         callbacks=[callback])
    trainer.fit(module, datamodule=ImageDataModule(dataset="digits", batch_size=8))


def test_include_keeps_part_of_a_prior_file_and_only_that_part_moves(
    tmp_path: Path, tiny_unet_config: dict
) -> None:
    module, start, whole = module_and_prior_file(tmp_path, tiny_unet_config)
    fit_with(module, CheckpointPrior(prior=str(tmp_path / "whole.safetensors"),
                                     include=["up_*"]), 2)
    assert module.prior.names == [n for n in whole.names if n.startswith("up_")]
    assert module.prior.numel < whole.numel
    for name, parameter in module.unet.named_parameters():
        assert (not torch.equal(parameter.detach(), start[name])) == name.startswith("up_"), name
    with pytest.raises(ValueError, match="no prior entry matches include"):
        whole.restricted(["nothing.*"])


def test_a_prior_centred_on_the_model_keeps_its_variances_around_the_starting_weights(
    tmp_path: Path, tiny_unet_config: dict
) -> None:
    # The file's mean is elsewhere (as the original's is for an already unlearned model).
    module, start, whole = module_and_prior_file(tmp_path, tiny_unet_config, offset=0.5)
    fit_with(module, CheckpointPrior(prior=str(tmp_path / "whole.safetensors"),
                                     centre="model"), 1)
    for name in whole.names:
        assert torch.equal(module.prior.mean[name], start[name])
        assert torch.equal(module.prior.var[name], whole.var[name])
    # After a step from the centre the pull is small; around the file's mean, the same
    # weights are pulled by the whole offset.
    centred = float(module.stability_loss())
    module.set_prior(whole)
    assert float(module.stability_loss()) > 100 * centred
    with pytest.raises(ValueError, match="centre must be one of"):
        CheckpointPrior(prior=str(tmp_path / "whole.safetensors"), centre="elsewhere")
    with pytest.raises(ValueError, match="the weights to centre on"):
        whole.recentred({"nothing": torch.zeros(1)})


def test_checkpoint_prior_needs_exactly_one_source() -> None:
    with pytest.raises(ValueError, match="exactly one of"):
        CheckpointPrior()
    with pytest.raises(ValueError, match="exactly one of"):
        CheckpointPrior(checkpoints=["a", "b"], prior="p.safetensors")
    with pytest.raises(ValueError, match="source must be one of"):
        CheckpointPrior(prior="p.safetensors", source="sideways")


@pytest.mark.parametrize("callback", [PriorSnapshot, CheckpointPrior])
def test_a_variance_floor_that_cannot_floor_is_refused_when_the_callback_is_made(
        callback: type) -> None:
    source = {"path": "p.safetensors"} if callback is PriorSnapshot else {"checkpoints": ["a", "b"]}
    with pytest.raises(ValueError, match=rf"^{callback.__name__} min_var must be a positive, "
                                         r"finite variance floor \(e\.g\. 1e-08\), got nan$"):
        callback(**source, min_var=float("nan"))


def test_a_prior_file_to_write_that_is_a_directory_is_refused_before_the_prior_is_made(
        tmp_path: Path, tiny_unet_config: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "taken").mkdir()
    snapshot = PriorSnapshot(str(tmp_path / "taken"), every_n_steps=1)
    with pytest.raises(IsADirectoryError, match=r"^cannot write the PriorSnapshot path \S*taken: "
                                                r"it is an existing directory; give the path of "
                                                r"a file$"):
        fit(tmp_path, DiffusionModule(unet=tiny_unet_config), [snapshot], max_steps=3)
    DiffusionModule(unet=tiny_unet_config).save_pretrained(tmp_path / "m")
    built = []
    monkeypatch.setattr(CheckpointPrior, "build", lambda self: built.append(self))
    callback = CheckpointPrior(checkpoints=[str(tmp_path / "m")] * 2,
                               save_to=str(tmp_path / "taken"))
    with pytest.raises(IsADirectoryError, match=r"^cannot write the CheckpointPrior save_to "
                                                r"\S*taken: it is an existing directory"):
        fit(tmp_path, VDUModule(str(tmp_path / "m")), [callback], max_steps=1)
    assert not built
