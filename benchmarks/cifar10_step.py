"""One VDU step on google/ddpm-cifar10-32's UNet (35.7 M parameters, 32x32 RGB): time and memory.

The UNet has that model's configuration and random weights (only costs are measured, and
no download is needed); the prior covers every parameter. The step is ``VDUModule``'s own,
run by a Lightning Trainer on random forget images: γ·S + (1 − γ)·P, backward, Adam.

    python benchmarks/cifar10_step.py --device cpu --batch-size 16 --steps 3
    python benchmarks/cifar10_step.py --device cuda --batch-size 64 128 --steps 20

Peak memory: ``torch.cuda.max_memory_allocated`` on a GPU, the process's peak RSS on a CPU.
Each batch size runs in a fresh process. Results: a markdown table on stdout, JSON with
``--out``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from fresh_process import machine_name, run_child, save_rows
from torch.utils.data import DataLoader

from vdu_lightning import DiffusionModule, ParameterPrior, VDUModule
from vdu_lightning.data.datasets import LabeledImages

#: google/ddpm-cifar10-32's unet/config.json, without its bookkeeping keys.
CIFAR10_UNET = {
    "sample_size": 32, "in_channels": 3, "out_channels": 3, "layers_per_block": 2,
    "block_out_channels": [128, 256, 256, 256],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": None, "downsample_padding": 0, "flip_sin_to_cos": False,
    "freq_shift": 1, "norm_eps": 1e-6, "norm_num_groups": 32,
}


class StepTimer(pl.Callback):
    """Wall time of each training step (batch start to batch end), synchronised on a GPU."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def _sync(self, module: pl.LightningModule) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync(pl_module)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync(pl_module)
        self.times.append(time.perf_counter() - self._start)


def run_one(device: str, batch_size: int, steps: int) -> dict:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:  # the "pre-trained" model, for this run
        DiffusionModule(unet=CIFAR10_UNET).save_pretrained(Path(folder) / "ddpm")
        module = VDUModule(str(Path(folder) / "ddpm"), gamma=0.97, lr=1e-5)
        generator = torch.Generator().manual_seed(1)
        module.set_prior(ParameterPrior.from_tensors(
            [{n: p.detach() + 1e-3 * torch.randn(p.shape, generator=generator)
              for n, p in module.unet.named_parameters()} for _ in range(3)], "finetune"))
        images = torch.rand(batch_size * (steps + 1), 3, 32, 32) * 2 - 1
        loader = DataLoader(LabeledImages(images, torch.ones(len(images), dtype=torch.long)),
                            batch_size=batch_size, shuffle=True)
        timer = StepTimer()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        trainer = pl.Trainer(accelerator=device, devices=1, max_steps=steps + 1, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, limit_val_batches=0,
                             callbacks=[timer])
        trainer.fit(module, train_dataloaders=loader)
    peak = (torch.cuda.max_memory_allocated() / 2**30 if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    return {"device": device, "batch_size": batch_size,
            "parameters": sum(p.numel() for p in module.unet.parameters()),
            "step_s": statistics.median(timer.times[1:]),  # the first step warms up
            "peak_gib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", nargs="+", type=int, default=[16])
    parser.add_argument("--steps", type=int, default=3, help="timed steps after a warm-up (>= 1)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.one:
        print(json.dumps(run_one(args.device, args.batch_size[0], args.steps)))
        return
    rows = [run_child([__file__, "--one", "--device", args.device, "--batch-size",
                       str(batch_size), "--steps", str(args.steps)], batch_size=batch_size)
            for batch_size in args.batch_size]
    machine = machine_name(args.device)
    print(f"VDU step, google/ddpm-cifar10-32's UNet, fp32, Adam, on {machine}\n")
    print("| batch | parameters | step (s) | peak memory (GiB) |")
    print("|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['batch_size']} | | failed: {row['error']} | |")
        else:
            print(f"| {row['batch_size']} | {row['parameters'] / 1e6:.1f} M | "
                  f"{row['step_s']:.2f} | {row['peak_gib']:.2f} |")
    save_rows(args.out, machine, rows)


if __name__ == "__main__":
    main()
