"""The diagonal Fisher information of a diffusion model, as EWC / Selective Amnesia use it.

F_i = E_x[(∂ℓ(x)/∂θ_i)²] with ℓ(x) = Σ_t ‖ε − ε_θ(x_t, t[, c])‖² the ε-loss of one image
summed over the timesteps (docs/method.md §7), x drawn from the model itself. Each image costs one
forward and backward pass over its timesteps, which is why the Fisher is the expensive part of
EWC; ``num_timesteps`` evenly spaced timesteps (scaled by T / num_timesteps) estimate the sum
over all T for less.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler
from torch import nn

from vdu_lightning.diffusion import predict_noise


def fisher_timesteps(num_train_timesteps: int, num_timesteps: int | None) -> torch.Tensor:
    """``num_timesteps`` evenly spaced timesteps of 0..T−1 (None: all T)."""
    if num_timesteps is None or num_timesteps >= num_train_timesteps:
        return torch.arange(num_train_timesteps)
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be at least 1, got {num_timesteps}")
    return torch.linspace(0, num_train_timesteps - 1, num_timesteps).round().long()


def diagonal_fisher(
    unet: nn.Module,
    scheduler: DDPMScheduler,
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    num_timesteps: int | None = None,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """The diagonal Fisher of ``unet``'s trainable parameters, by name, in float32.

    Args:
        unet: the network; parameters with ``requires_grad`` get an entry.
        scheduler: its noise scheduler (T and the noise schedule).
        images: the images x in [-1, 1], (N, C, H, W): the model's own samples.
        labels: their labels for a conditional network.
        num_timesteps: timesteps per image (None: all T).
        batch_size: timesteps per forward pass.
        generator: the noise ε (CPU generator; the same one gives the same estimate).

    Example:
        >>> from diffusers import UNet2DModel
        >>> unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1,
        ...                    block_out_channels=(8, 8), norm_num_groups=4,
        ...                    down_block_types=("DownBlock2D",) * 2,
        ...                    up_block_types=("UpBlock2D",) * 2)
        >>> fisher = diagonal_fisher(unet, DDPMScheduler(), torch.zeros(2, 1, 8, 8),
        ...                          num_timesteps=4)
        >>> bool(all((f >= 0).all() for f in fisher.values()))
        True
    """
    if len(images) == 0:
        raise ValueError("diagonal_fisher needs at least one image")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    total = scheduler.config.num_train_timesteps
    timesteps = fisher_timesteps(total, num_timesteps)
    scale = total / len(timesteps)
    named = [(n, p) for n, p in unet.named_parameters() if p.requires_grad]
    parameters = [p for _, p in named]
    fisher = [torch.zeros_like(p, dtype=torch.float32) for p in parameters]
    device = parameters[0].device
    was_training = unet.training
    unet.eval()  # dropout off: the Fisher of the model as it samples
    for index, image in enumerate(images):
        grads = [torch.zeros_like(f) for f in fisher]
        for chunk in timesteps.split(batch_size):
            t = chunk.to(device)
            x0 = image.to(device).expand(len(t), *image.shape)
            noise = torch.randn(x0.shape, generator=generator).to(device)
            label = None if labels is None else labels[index].to(device).expand(len(t))
            predicted = predict_noise(unet, scheduler.add_noise(x0, noise, t), t, label)
            loss = scale * (predicted.float() - noise).pow(2).sum()
            for g, d in zip(grads, torch.autograd.grad(loss, parameters, allow_unused=True)):
                if d is not None:
                    g.add_(d.float())
        torch._foreach_addcmul_(fisher, grads, grads)
    unet.train(was_training)
    torch._foreach_div_(fisher, float(len(images)))
    return {name: f for (name, _), f in zip(named, fisher)}
