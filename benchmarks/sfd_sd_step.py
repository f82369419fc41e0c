"""One SFD iteration on a Stable-Diffusion-1.5-sized pipeline: time and peak memory.

What ``TextToImageSFDModule`` does per iteration, through a real Lightning Trainer: a
fake-score step (the generator's one-step latents, then the fake score's denoising score
matching) and a generator step (fresh latents, the teacher — twice with guidance — and the
fake score, Score identity Distillation), Adam on the generator and the fake score, the EMA.
The pipeline is written first with SD 1.5's UNet (860 M parameters), VAE and text encoder
configurations and random weights: only costs are measured. The tokenizer spells words
letter by letter (no vocabulary file is downloaded), so the text encoder's token table is
smaller than CLIP's (49,408 × 768 entries: 0.15 GB more in fp32); it runs once per run (the
prompts' embeddings are kept).

Each configuration runs in a fresh process, so that its peak memory is its own:
``torch.cuda.max_memory_allocated`` on a GPU, the process's peak RSS on a CPU.

    python benchmarks/sfd_sd_step.py --device cuda --batch-size 1 4 \
        --precision fp32 bf16-mixed --gradient-checkpointing both
    python benchmarks/sfd_sd_step.py --tiny --device cpu        # a smoke run, seconds

Options: ``--steps`` (timed iterations after one warm-up, 3), ``--guidance-scale`` (2),
``--pipeline`` (where the pipeline is written, kept between runs), ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import string
import time
from pathlib import Path

import torch
from fresh_process import machine_name, run_child, save_rows
from sd_step import SD15_UNET

SD_VAE = {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2,
          "down_block_types": ("DownEncoderBlock2D",) * 4,
          "up_block_types": ("UpDecoderBlock2D",) * 4, "latent_channels": 4, "sample_size": 512}
SD_TEXT = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
           "num_attention_heads": 12, "max_position_embeddings": 77}
TINY_UNET = {"sample_size": 8, "cross_attention_dim": 32, "attention_head_dim": 4,
             "block_out_channels": (16, 32), "layers_per_block": 1, "norm_num_groups": 8,
             "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
             "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D")}
TINY_VAE = {"block_out_channels": (8, 16), "layers_per_block": 1, "norm_num_groups": 8,
            "down_block_types": ("DownEncoderBlock2D",) * 2,
            "up_block_types": ("UpDecoderBlock2D",) * 2, "latent_channels": 4, "sample_size": 16}
TINY_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "max_position_embeddings": 77}
PROMPTS = {"forget_prompts": ["a portrait of jane doe", "jane doe smiling"],
           "override_prompts": ["a portrait of a person", "a person smiling"],
           "retain_prompts": ["a portrait of a woman", "a red car", "a bowl of fruit"]}


def write_pipeline(path: Path, tiny: bool) -> Path:
    """An SD 1.x pipeline directory of random weights (SD 1.5's sizes, or tiny ones)."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if (path / "model_index.json").is_file():
        return path
    words = path.parent / f".{path.name}-tokenizer"
    words.mkdir(parents=True, exist_ok=True)
    letters = list(string.ascii_lowercase)
    tokens = ["<|startoftext|>", "<|endoftext|>"] + letters + [f"{c}</w>" for c in letters]
    (words / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (words / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(words / "vocab.json"), str(words / "merges.txt"),
                              model_max_length=77)
    torch.manual_seed(0)
    text = TINY_TEXT if tiny else SD_TEXT
    pipeline = StableDiffusionPipeline(
        unet=UNet2DConditionModel(**(TINY_UNET if tiny else SD15_UNET)),
        vae=AutoencoderKL(**(TINY_VAE if tiny else SD_VAE)),
        text_encoder=CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=0,
                                                  eos_token_id=1, pad_token_id=1, **text)),
        tokenizer=tokenizer,
        scheduler=DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                beta_end=0.012),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipeline.save_pretrained(path)
    return path


def run_one(pipeline: str, device: str, precision: str, batch_size: int, steps: int,
            checkpointing: bool, guidance_scale: float) -> dict:
    """Times ``steps`` iterations after a warm-up; the peak memory of the whole run."""
    import lightning.pytorch as pl

    from vdu_lightning import TextToImageSFDModule

    times: list[float] = []

    class IterationTimer(pl.Callback):
        def on_train_batch_start(self, *args: object) -> None:
            if device == "cuda":
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_train_batch_end(self, *args: object) -> None:
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.start)

    module = TextToImageSFDModule(pipeline, **PROMPTS, guidance_scale=guidance_scale,
                                  batch_size=batch_size, gradient_checkpointing=checkpointing)
    parameters = sum(p.numel() for p in module.generator.parameters())
    precision_arg = "32-true" if precision == "fp32" else precision
    pl.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1,
               precision=precision_arg, max_steps=2 * (1 + steps), logger=False,
               enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, callbacks=[IterationTimer()]).fit(module)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB → GiB
    return {"device": device, "precision": precision, "batch_size": batch_size,
            "gradient_checkpointing": checkpointing, "guidance_scale": guidance_scale,
            "unet_parameters": parameters, "iteration_s": statistics.median(times[1:]),
            "peak_gib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16-mixed"],
                        choices=["fp32", "bf16-mixed", "16-mixed"])
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--guidance-scale", type=float, default=2.0)
    parser.add_argument("--gradient-checkpointing", choices=["off", "on", "both"],
                        default="off")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--pipeline", default="runs/bench/sd15_random")
    parser.add_argument("--out", default=None)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child run
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.pipeline, args.device, args.precision[0],
                                 args.batch_size[0], args.steps,
                                 args.gradient_checkpointing == "on", args.guidance_scale)))
        return
    pipeline = write_pipeline(Path(args.pipeline + ("_tiny" if args.tiny else "")), args.tiny)
    checkpointing = {"off": ["off"], "on": ["on"], "both": ["off", "on"]}
    rows = []
    for batch_size in args.batch_size:
        for precision in args.precision:
            for ckpt in checkpointing[args.gradient_checkpointing]:
                command = [__file__, "--one", "--pipeline", str(pipeline), "--device",
                           args.device, "--precision", precision, "--batch-size",
                           str(batch_size), "--steps", str(args.steps), "--guidance-scale",
                           str(args.guidance_scale), "--gradient-checkpointing", ckpt]
                # A failure (e.g. out of memory) is a row that says so; the others still run.
                rows.append(run_child(command, precision=precision, batch_size=batch_size,
                                      gradient_checkpointing=ckpt == "on"))
    machine = machine_name(args.device)
    size = "tiny" if args.tiny else "SD-1.5-sized"
    print(f"SFD on the {size} pipeline, guidance {args.guidance_scale}, "
          f"Adam on two UNets, on {machine}\n")
    print("| batch | precision | checkpointing | iteration (s) | peak memory (GiB) |")
    print("|---|---|---|---|---|")
    for row in rows:
        head = (f"| {row['batch_size']} | {row['precision']} | "
                f"{'on' if row['gradient_checkpointing'] else 'off'} |")
        if "error" in row:
            print(f"{head} failed: {row['error']} | |")
        else:
            print(f"{head} {row['iteration_s']:.3f} | {row['peak_gib']:.2f} |")
    save_rows(args.out, machine, rows)


if __name__ == "__main__":
    main()
