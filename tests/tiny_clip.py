"""A tiny CLIP model and processor built in code and saved to a local directory (no network).

The tokenizer is tiny_sd's letters-only vocabulary (each word spelt letter by letter); the
vision tower takes the 16×16 images of the tiny SD pipeline directly (no resizing).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from tiny_sd import IMAGE_SIZE, _tokenizer


def save_tiny_clip(path: Path, seed: int = 0) -> Path:
    """Write a tiny ``CLIPModel`` and its ``CLIPProcessor`` at ``path``."""
    tokenizer = _tokenizer(path.parent / f".{path.name}-tokenizer")
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 32,
                     "num_hidden_layers": 1, "num_attention_heads": 2,
                     "max_position_embeddings": tokenizer.model_max_length,
                     "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": IMAGE_SIZE, "patch_size": 4},
        projection_dim=8,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                         crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


class PooledCLIP(nn.Module):
    """torchmetrics 1.9's CLIP score expects tensors from get_*_features, which transformers 5
    wraps in a ModelOutput (Lightning-AI/torchmetrics#3407): unwrap, nothing else."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args: object) -> torch.Tensor:
        return self.model.get_image_features(*args).pooler_output

    def get_text_features(self, *args: object) -> torch.Tensor:
        return self.model.get_text_features(*args).pooler_output
