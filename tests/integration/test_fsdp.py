"""VDUModule over sharded parameters, on this CPU-only machine (two processes, gloo).

* ``strategy="fsdp"`` (Lightning's FSDPStrategy, torch FSDP1) is refused on CPU by Lightning.
* ``ModelParallelStrategy`` (FSDP2, ``fully_shard``, sharding done by
  ``VDUModule.configure_model``) runs on CPU: the stability term and two SGD steps must
  equal a single process's.
* What ``strategy="fsdp"`` would do on GPUs is checked with torch FSDP1 directly on CPU (it
  runs there when given ``device_id=cpu``, which Lightning never passes), called the way
  Lightning calls ``training_step``.

Every rank gets the same batch and the same noise, so every rank's plasticity gradient is the
single process's and so is their average: any difference left comes from the sharding. SGD,
not Adam, so that a wrongly scaled gradient shows in the step. One subprocess serves all
checks: starting the processes costs more than the work. Run as a script, this file is that
subprocess (ModelParallelStrategy's launcher re-runs the script for rank 1).
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from vdu_lightning import DiffusionModule, ParameterPrior, VDUModule
from vdu_lightning.callbacks import ExportPretrained, UnlearningEvaluation
from vdu_lightning.checkpoints import read_unet_weights

pytestmark = pytest.mark.timeout(240)
# Two steps: the second runs on what the first cached.
LR, GAMMA, STEPS = 0.5, 0.5, 2


class SameNoiseVDU(VDUModule):
    """VDU drawing the same noise on every rank (VDU seeds each rank apart on purpose)."""

    def on_train_start(self) -> None:
        super().on_train_start()
        self.noise.generator = torch.Generator(self.device).manual_seed(0)


def make_module(pretrained: str) -> SameNoiseVDU:
    """The module with a prior over every parameter, the same in every process."""
    module = SameNoiseVDU(pretrained, gamma=GAMMA, optimizer="sgd", lr=LR)
    generator = torch.Generator().manual_seed(1)
    named = dict(module.unet.named_parameters())
    mean = {n: p.detach() + 1e-2 * torch.randn(p.shape, generator=generator)
            for n, p in named.items()}
    var = {n: 1e-4 * (1 + torch.rand(p.shape, generator=generator)) for n, p in named.items()}
    module.set_prior(ParameterPrior(mean, var, count=3, source="independent"))
    return module


def forget_loader() -> torch.utils.data.DataLoader:
    images = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    return torch.utils.data.DataLoader([{"image": x, "label": 0} for x in images], batch_size=8)


def trainer(**kwargs) -> pl.Trainer:
    # No distributed sampler: every rank trains on the whole (one-batch) loader.
    return pl.Trainer(accelerator="cpu", max_steps=STEPS, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      use_distributed_sampler=False, **kwargs)


def weights_of(module: VDUModule) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.unet.named_parameters()}


def fsdp1_steps(pretrained: str, fsdp: dict | None) -> tuple[float, dict[str, torch.Tensor]]:
    """The last S and the weights after SGD steps on ``objective``, in one process (``fsdp``
    None) or under torch FSDP1 with the kwargs ``fsdp`` as Lightning's FSDPStrategy wraps a module
    (the LightningModule as root, ``use_orig_params=True``), reached through the root's
    forward as Lightning's ``training_step`` is (its own ``_ForwardRedirection``)."""
    from lightning.pytorch.strategies.strategy import _ForwardRedirection
    from torch.distributed.fsdp import FullyShardedDataParallel

    module = make_module(pretrained)
    module.noise.generator = torch.Generator().manual_seed(0)
    batch = next(iter(forget_loader()))
    model = module
    if fsdp is not None:
        model = FullyShardedDataParallel(module, use_orig_params=True,
                                         device_id=torch.device("cpu"), **fsdp)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(STEPS):
        optimizer.zero_grad()
        if fsdp is None:
            terms = module.objective(batch)
        else:
            terms = _ForwardRedirection()(model, module, "objective", batch)
        terms["loss"].backward()
        optimizer.step()
    if fsdp is None:
        return float(terms["stability"]), weights_of(module)
    with FullyShardedDataParallel.summon_full_params(model):
        return float(terms["stability"]), weights_of(module)


def run_ranks(pretrained: str, out_dir: str) -> None:
    """What each of the two processes does; results go to ``<out_dir>/rank<r>.pt``."""
    from diffusers.models.unets.unet_2d_blocks import DownBlock2D, UpBlock2D
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    record: dict = {}
    module = make_module(pretrained)
    fit = trainer(devices=2, strategy=ModelParallelStrategy(
        data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=False,
        timeout=timedelta(seconds=60)))
    fit.fit(module, train_dataloaders=forget_loader())
    rank = fit.global_rank
    record["fsdp2_stability"] = float(module.loss_terms["stability"])
    record["fsdp2_local_shapes"] = {n: tuple(p.to_local().shape) for n, p in
                                    module.unet.named_parameters() if n.startswith("conv_")}
    record["fsdp2_weights"] = {n.removeprefix("unet."): t for n, t in
                               fit.strategy.lightning_module_state_dict().items()}
    # The documented way out of FSDP2: one-file checkpoint, exported in one process.
    fit.save_checkpoint(Path(out_dir) / "fsdp2.ckpt")
    # Lightning leaves the process group up: FSDP1 runs in it.
    record["fsdp1_stability"], record["fsdp1_weights"] = fsdp1_steps(pretrained, {})
    try:  # the usual memory-saving setup: each block its own FSDP unit
        fsdp1_steps(pretrained, {"auto_wrap_policy": ModuleWrapPolicy({DownBlock2D, UpBlock2D})})
    except RuntimeError as err:
        record["fsdp1_wrapped_error"] = str(err)
    torch.save(record, Path(out_dir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The two ranks' records and the single-process references."""
    from conftest import TINY_UNET

    root = tmp_path_factory.mktemp("fsdp")
    torch.manual_seed(0)
    DiffusionModule(unet=dict(TINY_UNET), num_train_timesteps=100).save_pretrained(root / "ddpm")
    pretrained = str(root / "ddpm")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ranks = subprocess.Popen([sys.executable, __file__, pretrained, str(root)], cwd=root,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    # The single-process references, while the ranks start.
    module = make_module(pretrained)
    initial = weights_of(module)
    trainer(devices=1).fit(module, train_dataloaders=forget_loader())
    single = {"stability": float(module.loss_terms["stability"]), "weights": weights_of(module)}
    single["fsdp1_stability"], single["fsdp1_weights"] = fsdp1_steps(pretrained, None)
    output = ranks.communicate(timeout=200)[0]
    assert ranks.returncode == 0, output[-3000:]
    return {"ranks": [torch.load(root / f"rank{r}.pt", weights_only=True) for r in range(2)],
            "single": single, "initial": initial, "root": root}


def assert_same_step(weights: dict, reference: dict, initial: dict) -> None:
    assert weights.keys() == reference.keys()
    moved = max(float((reference[n] - initial[n]).abs().max()) for n in reference)
    assert moved > 1e-3  # the step is large enough for a wrong gradient to show
    for name in reference:
        torch.testing.assert_close(weights[name], reference[name], rtol=0, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")


def test_lightning_refuses_strategy_fsdp_on_cpu() -> None:
    from lightning.pytorch.strategies import FSDPStrategy

    for strategy in ("fsdp", FSDPStrategy(), "fsdp_cpu_offload"):
        with pytest.raises(ValueError, match=r"The strategy `fsdp` requires a GPU accelerator, "
                                             r"but received `accelerator='cpu'`"):
            pl.Trainer(accelerator="cpu", devices=2, strategy=strategy)


def test_fsdp2_shards_and_matches_one_process(runs: dict) -> None:
    ranks, single = runs["ranks"], runs["single"]
    # Really sharded on dim 0, unevenly where it cannot be even (conv_out has 1 channel).
    assert ranks[0]["fsdp2_local_shapes"]["conv_in.weight"] == (8, 1, 3, 3)
    assert ranks[1]["fsdp2_local_shapes"]["conv_in.weight"] == (8, 1, 3, 3)
    assert ranks[0]["fsdp2_local_shapes"]["conv_out.weight"] == (1, 16, 3, 3)
    assert ranks[1]["fsdp2_local_shapes"]["conv_out.weight"] == (0, 16, 3, 3)
    for rank in ranks:  # every rank logs the whole S, not its shard's part
        assert rank["fsdp2_stability"] == pytest.approx(single["stability"], rel=1e-6)
    assert_same_step(ranks[0]["fsdp2_weights"], single["weights"], runs["initial"])


def test_an_fsdp2_checkpoint_exports_in_one_process(runs: dict) -> None:
    module = VDUModule.load_from_checkpoint(runs["root"] / "fsdp2.ckpt", weights_only=True)
    assert module.prior is not None and module.prior.count == 3
    module.save_pretrained(runs["root"] / "exported")
    exported = read_unet_weights(runs["root"] / "exported")
    for name, value in runs["ranks"][0]["fsdp2_weights"].items():
        assert torch.equal(exported[name], value), name


@pytest.mark.parametrize("callback", [ExportPretrained("unused"),
                                      UnlearningEvaluation(classifier="unused")])
def test_callbacks_that_need_the_whole_network_refuse_fsdp2(runs: dict,
                                                            callback: pl.Callback) -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    fit = pl.Trainer(accelerator="cpu", devices=1, logger=False, strategy=ModelParallelStrategy(
        data_parallel_size=1, tensor_parallel_size=1))
    with pytest.raises(ValueError, match=rf"{type(callback).__name__} does not run under "
                                         r"ModelParallelStrategy \(FSDP2\)"):
        callback.setup(fit, VDUModule(str(runs["root"] / "ddpm")), "fit")


def test_fsdp1_root_unit_matches_one_process(runs: dict) -> None:
    ranks, single = runs["ranks"], runs["single"]
    for rank in ranks:
        assert rank["fsdp1_stability"] == pytest.approx(single["fsdp1_stability"], rel=1e-6)
        assert_same_step(rank["fsdp1_weights"], single["fsdp1_weights"], runs["initial"])


def test_fsdp1_with_wrapped_blocks_is_refused_not_miscomputed(runs: dict) -> None:
    for rank in runs["ranks"]:
        assert "cannot see the full parameters" in rank["fsdp1_wrapped_error"]
        assert "auto_wrap_policy" in rank["fsdp1_wrapped_error"]


if __name__ == "__main__":
    run_ranks(*sys.argv[1:3])
