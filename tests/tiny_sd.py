"""A tiny Stable-Diffusion pipeline built in code: every real component, seconds on a CPU.

``save_tiny_sd(path)`` writes the SD 1.x directory layout (unet/, vae/, text_encoder/,
tokenizer/, scheduler/, model_index.json). The tokenizer's vocabulary is the letters
(each word is spelt letter by letter: no merges), written by the fixture itself.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

#: Images of 16×16 pixels; the VAE halves them to 8×8 latents of 4 channels.
IMAGE_SIZE = 16
TEXT_DIM = 32


def _tokenizer(folder: Path) -> CLIPTokenizer:
    folder.mkdir(parents=True, exist_ok=True)
    letters = list(string.ascii_lowercase)
    tokens = ["<|startoftext|>", "<|endoftext|>"] + letters + [f"{c}</w>" for c in letters]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                         model_max_length=16)


def tiny_sd_pipeline(scratch: Path, seed: int = 0) -> StableDiffusionPipeline:
    """The pipeline, its weights drawn from ``seed`` (the tokenizer's files go to ``scratch``)."""
    tokenizer = _tokenizer(scratch)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=TEXT_DIM,
        attention_head_dim=4, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=IMAGE_SIZE,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, num_train_timesteps=1000)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def save_tiny_sd(path: Path, seed: int = 0) -> Path:
    """Write a tiny SD 1.x pipeline directory at ``path``."""
    tiny_sd_pipeline(path.parent / f".{path.name}-tokenizer", seed).save_pretrained(path)
    return path


def captioned_folder(folder: Path, count: int, caption: str = "a photo", seed: int = 0) -> Path:
    """``count`` random images with captions "<caption> <i>", in the layout of diffusers'
    training scripts (``metadata.jsonl``)."""
    folder.mkdir(parents=True)
    generator = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        pixels = generator.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"{caption} {i}"})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return folder
