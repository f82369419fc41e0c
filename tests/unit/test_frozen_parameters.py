"""What ``unlearning_parameters()`` leaves out is frozen: no gradient is computed for it (the
stability term covers it too) and DDP, which all-reduces what requires a gradient, sends none.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

from vdu_lightning import DiffusionModule, ForgetSetDataModule, ParameterPrior, VDUModule


class UpBlocksOnly(VDUModule):
    """Trains the decoder alone, under a prior that covers the whole network."""

    def unlearning_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in super().unlearning_parameters() if n.startswith("up_"))


def test_parameters_a_subclass_does_not_train_get_no_gradient(
        tmp_path: Path, tiny_unet_config: dict) -> None:
    torch.manual_seed(0)
    DiffusionModule(unet=tiny_unet_config, num_train_timesteps=100).save_pretrained(
        tmp_path / "ddpm")
    module = UpBlocksOnly(str(tmp_path / "ddpm"), lr=1e-3)
    snapshots = [{n: p.detach() + 1e-2 * k for n, p in module.unet.named_parameters()}
                 for k in range(3)]
    module.set_prior(ParameterPrior.from_tensors(snapshots, "independent"))
    data = ForgetSetDataModule(dataset="digits", forget_classes=[3], forget_size=32,
                               eval_size=16, batch_size=16)
    pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
               default_root_dir=tmp_path).fit(module, datamodule=data)

    named = dict(module.unet.named_parameters())
    trained = {n for n, _ in module.unlearning_parameters()}
    assert trained and trained < set(named)
    for name, parameter in named.items():
        assert parameter.requires_grad == (name in trained), name
        if name not in trained:
            assert parameter.grad is None, f"{name} got a gradient"
