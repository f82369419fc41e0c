"""One VDU training step on a Stable-Diffusion-1.5-sized UNet: time and peak memory.

The UNet has SD 1.5's configuration (860 M parameters, cross-attention on 77×768 text
embeddings) and random weights: only costs are measured. A step is what
``TextToImageVDUModule`` does after the frozen parts: γ·S over the trainable subset (a prior
over it, fp32) + (1 − γ)·P (minus the denoising error of 64×64 latents), backward, Adam.
The VAE and the text encoder (frozen, run once per image with ``cache_latents``) are not in
the step; their weights add 0.33 GB (VAE) and 0.49 GB (text encoder) in fp32.

Each configuration runs in a fresh process, so that its peak memory is its own: on a GPU
``torch.cuda.max_memory_allocated``, on a CPU the process's peak RSS.

    python benchmarks/sd_step.py --device cuda                    # full and cross-attention,
                                                                  # fp32, bf16-mixed, 16-mixed
    python benchmarks/sd_step.py --device cpu --trainable cross_attention \
        --precision fp32 bf16-mixed

Options: ``--batch-size`` (1), ``--steps`` (timed steps after one warm-up, 3),
``--gradient-checkpointing``, ``--out`` (JSON). Results go to stdout as a markdown table.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import resource
import statistics
import time

import torch
from fresh_process import machine_name, run_child, save_rows

from vdu_lightning.losses import denoising_error, stability_penalty
from vdu_lightning.methods.text_to_image.module import TRAINABLE_SUBSETS

SD15_UNET = {
    "sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8,
    "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
}
PRECISIONS = {"fp32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def run_one(device: str, trainable: str, precision: str, batch_size: int, steps: int,
            checkpointing: bool) -> dict:
    """Times ``steps`` steps after a warm-up; the peak memory of the whole run."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).to(device)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    patterns = TRAINABLE_SUBSETS[trainable]
    named = [(n, p) for n, p in unet.named_parameters()
             if any(fnmatch.fnmatchcase(n, q) for q in patterns)]
    for parameter in unet.parameters():
        parameter.requires_grad_(False)
    params = [p.requires_grad_(True) for _, p in named]
    # The prior: fp32 mean and 1/σ over the trainable subset.
    means = [p.detach().clone().float() for p in params]
    inv_stds = [torch.full_like(p, 100.0, dtype=torch.float32) for p in params]
    optimizer = torch.optim.Adam(params, lr=1e-5)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    scaler = torch.amp.GradScaler(device) if precision == "16-mixed" else None
    dtype = PRECISIONS[precision]

    def step() -> None:
        latents = torch.randn(batch_size, 4, 64, 64, device=device)
        text = torch.randn(batch_size, 77, 768, device=device)
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (batch_size,), device=device)
        x_t = scheduler.add_noise(latents, noise, t)
        with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
            predicted = unet(x_t, t, encoder_hidden_states=text).sample
        plasticity = -denoising_error(predicted.float(), noise)
        loss = 0.5 * stability_penalty(params, means, inv_stds, "mean") + 0.5 * plasticity
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

    def synchronize() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up: allocations, kernels, Adam's state
    synchronize()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        synchronize()
        times.append(time.perf_counter() - start)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB → GiB
    return {"device": device, "trainable": trainable, "precision": precision,
            "batch_size": batch_size, "gradient_checkpointing": checkpointing,
            "trainable_parameters": sum(p.numel() for p in params),
            "step_s": statistics.median(times), "peak_gib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--trainable", nargs="+", default=["full", "cross_attention"],
                        choices=sorted(TRAINABLE_SUBSETS))
    parser.add_argument("--precision", nargs="+", choices=sorted(PRECISIONS), default=None)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child run
    args = parser.parse_args()
    precisions = args.precision or (["fp32", "bf16-mixed", "16-mixed"] if args.device == "cuda"
                                    else ["fp32", "bf16-mixed"])
    if args.one:
        print(json.dumps(run_one(args.device, args.trainable[0], precisions[0], args.batch_size,
                                 args.steps, args.gradient_checkpointing)))
        return
    rows = []
    for trainable in args.trainable:
        for precision in precisions:
            command = [__file__, "--one", "--device", args.device,
                       "--trainable", trainable, "--precision", precision,
                       "--batch-size", str(args.batch_size), "--steps", str(args.steps)]
            if args.gradient_checkpointing:
                command.append("--gradient-checkpointing")
            # A failure (e.g. out of memory) is a row that says so; the others still run.
            rows.append(run_child(command, trainable=trainable, precision=precision))
    machine = machine_name(args.device)
    print(f"SD-1.5-sized UNet, 64x64 latents, batch {args.batch_size}, Adam, on {machine}\n")
    print("| trainable | parameters | precision | step (s) | peak memory (GiB) |")
    print("|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['trainable']} | | {row['precision']} | failed: {row['error']} | |")
        else:
            print(f"| {row['trainable']} | {row['trainable_parameters'] / 1e6:.1f} M | "
                  f"{row['precision']} | {row['step_s']:.2f} | {row['peak_gib']:.2f} |")
    save_rows(args.out, machine, rows)


if __name__ == "__main__":
    main()
